"""Zero-shot accuracy with lm-evaluation-harness (`--tasks`), on the dense and the pruned checkpoint.

Optional: `pip install -e .[eval]`. Tasks are lm-eval's registered names (arc_easy, piqa, ...) or
paths to task YAML files (their `task:` name is used), so a local task needs no hub. Both models are
loaded with `from_pretrained` (the pruned one from the finished output folder) and handed to lm-eval
as model objects; evaluation runs after the checkpoint is complete, and its results are added to
report.json, so an interrupted evaluation is simply run again by the same command.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

METRICS = ("acc", "acc_norm")


class TasksError(ValueError):
    pass


def parse(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TasksError("--tasks needs lm-evaluation-harness: pip install -e .[eval]") from None
    return lm_eval, TaskManager


def _task_name(path: Path) -> str:
    import yaml
    try:
        name = (yaml.safe_load(path.read_text()) or {}).get("task")
    except Exception as e:  # noqa: BLE001 - a bad YAML is one bad-input message
        raise TasksError(f"unreadable task file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(name, str):
        raise TasksError(f"task file {path} has no 'task:' name")
    return name


def resolve(entries: list[str]):
    """(task names, TaskManager) for `--tasks` entries; unknown names, bad files and data that cannot
    be read fail here, before any pruning. Built-in tasks are indexed only when a
    registered name is asked for (it takes seconds). Each task is built once here, which reads its
    data: from the local cache, or downloaded into it when the hub can be reached; where it cannot,
    this process goes offline (`go_offline`), so neither this check nor the evaluation retries."""
    _, TaskManager = _harness()
    names, include = [], []
    for e in entries:
        p = Path(e).expanduser()
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise TasksError(f"task file not found: {e}")
            names.append(_task_name(p))
            include.append(str(p.parent.absolute()))
        else:
            names.append(e)
    builtin = len(include) < len(names)
    with _quiet():
        tm = TaskManager(include_path=sorted(set(include)) or None, include_defaults=builtin)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise TasksError(f"unknown lm-eval task {', '.join(unknown)} (a registered name, or a task YAML file)")
    check_data(names, tm)
    return names, tm


OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT = 3.0  # seconds to open a connection to the hub before calling it unreachable


def offline_requested() -> bool:
    import huggingface_hub.constants as hc
    return hc.HF_HUB_OFFLINE or any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARS)


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the hub's endpoint (HF_ENDPOINT) opens within `timeout` seconds:
    one try, where huggingface_hub would retry each request five times with back-off (~25 s and
    a warning per try, when the network is down)."""
    import huggingface_hub.constants as hc
    u = urlparse(hc.ENDPOINT)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """Hub and datasets read only their local caches from now on, in this process and its children.
    Their libraries read the environment once, at import: set their flags too."""
    for v in OFFLINE_VARS:
        os.environ[v] = "1"
    import huggingface_hub.constants as hc
    hc.HF_HUB_OFFLINE = True
    try:
        import datasets.config as dc
        dc.HF_HUB_OFFLINE = dc.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass


def check_data(names: list[str], tm) -> None:
    """Build each task (lm-eval reads its data then); the first that fails is one error naming it."""
    offline = offline_requested()
    if not offline and not hub_reachable():
        go_offline()
        offline = "unreachable"
    for n in names:
        try:
            with _quiet(logging.ERROR), _no_progress_bars():
                tm.load([n])
        except Exception as e:  # noqa: BLE001 - whatever the loader raises is one bad-input line
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = {"unreachable": f"the hub ({_endpoint()}) cannot be reached and it is not in the local cache",
                     True: "offline (HF_HUB_OFFLINE) and it is not in the local cache"}.get(offline, why)
            raise TasksError(f"task {n}: its data cannot be read: {where} ({why})") from None


def _endpoint() -> str:
    import huggingface_hub.constants as hc
    return urlparse(hc.ENDPOINT).hostname or hc.ENDPOINT


@contextlib.contextmanager
def _no_progress_bars():
    try:
        import datasets as dt
        from datasets.utils import logging as dl
    except ImportError:
        yield
        return
    was = dt.are_progress_bars_disabled()
    dt.disable_progress_bars()
    old = dl.get_verbosity()
    dl.set_verbosity_error()
    try:
        yield
    finally:
        dl.set_verbosity(old)
        if not was:
            dt.enable_progress_bars()


@contextlib.contextmanager
def _quiet(level=logging.WARNING):
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def accuracies(folder: str | Path, names: list[str], tm, device: str, dtype: str, batch_size: int,
               quiet: bool = False) -> dict:
    """{task: {acc, acc_norm (where the task has it)}} of the model in `folder`, zero-shot."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = getattr(torch, str(dtype).removeprefix("torch."), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with _quiet(logging.ERROR if quiet else logging.WARNING):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, num_fewshot=0, bootstrap_iters=0,
                              log_samples=False)
    out = {}
    for n in names:
        r = res["results"][n]
        out[n] = {m: float(r[f"{m},none"]) for m in METRICS if f"{m},none" in r}
    return out


@contextlib.contextmanager
def local_copy(out):
    """A local folder holding the output's top-level files (the checkpoint): the folder itself when
    local, else a temporary copy (from_pretrained reads local files)."""
    if out.local:
        yield out.root
        return
    with tempfile.TemporaryDirectory() as d:
        for name in out.listdir(""):
            if not name.startswith(".") and name != "report.json":
                (Path(d) / name).write_bytes(out.read_bytes(name))
        yield d


def add_to_report(report: dict, out, resolved, batch_size: int = 4, progress=None) -> dict:
    """Run the tasks (`resolve`'s answer) on the dense model (report['model']) and on the pruned
    checkpoint in `out` (an OutputDir), add `zero_shot` to the report and rewrite report.json. A
    report that already holds these tasks is returned unchanged."""
    names, tm = resolved
    quiet = progress is None
    have = report.get("zero_shot") or {}
    if have.get("tasks") == names:
        return report
    import lm_eval
    t0 = time.perf_counter()
    dev, dt = report.get("device", "cpu"), report.get("dtype", "float32")
    if progress:
        progress(f"lm-eval {', '.join(names)}: dense model")
    dense = accuracies(report["model"], names, tm, dev, dt, batch_size, quiet)
    if progress:
        progress(f"lm-eval {', '.join(names)}: pruned model")
    with local_copy(out) as folder:
        pruned = accuracies(folder, names, tm, dev, dt, batch_size, quiet)
    report = dict(report, zero_shot={"tasks": names, "num_fewshot": 0, "harness": f"lm-eval {lm_eval.__version__}",
                                     "dense": dense, "pruned": pruned, "seconds": time.perf_counter() - t0})
    out.write_json("report.json", report)
    return report


def summary(report: dict) -> list[str]:
    z = report.get("zero_shot") or {}
    lines = []
    for n in z.get("tasks", []):
        d, p = z["dense"][n], z["pruned"][n]
        lines.append(f"{n}: " + "  ".join(f"{m} {d[m]:.4f} -> {p[m]:.4f}" for m in METRICS if m in d))
    return lines
