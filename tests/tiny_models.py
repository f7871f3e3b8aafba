"""Tiny random models of many architectures, written by `save_pretrained` (the hub layout: experts
one tensor each, GPT-NeoX's `embed_out`...), each with SmolLM2's tokenizer.

Shapes are tiny so the whole matrix runs in minutes on 2 CPU cores. Where an effect is invisible at
default init (Gemma 2 softcapping, Granite/Cohere multipliers, DeepSeek's router bias) the config or
the weights are set so that it matters.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

V = 49152  # SmolLM2's vocabulary: the tests tokenize real text with its tokenizer
IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
ATTN = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
            max_position_embeddings=256, **IDS)


def config(arch: str):
    import transformers as tf
    moe = dict(intermediate_size=64, num_hidden_layers=2, **ATTN)
    c = {
        "llama": lambda: tf.LlamaConfig(intermediate_size=128, num_hidden_layers=2, **ATTN),
        "qwen3": lambda: tf.Qwen3Config(intermediate_size=128, num_hidden_layers=2, head_dim=16, **ATTN),
        # Softcapping at 0.5 with large logits: without it perplexity is far off.
        "gemma2": lambda: tf.Gemma2Config(intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                          final_logit_softcapping=0.5, initializer_range=0.2, **ATTN),
        "gemma3_text": lambda: tf.Gemma3TextConfig(intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                                   sliding_window=8, **ATTN),
        # Multimodal: the text layers under language_model.*, a vision tower beside them.
        "gemma3": lambda: tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                            sliding_window=8, **ATTN).to_dict(),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 2, eoi_token_index=V - 3),
        "cohere": lambda: tf.CohereConfig(intermediate_size=128, num_hidden_layers=2, logit_scale=0.25, **ATTN),
        "granite": lambda: tf.GraniteConfig(intermediate_size=128, num_hidden_layers=2, logits_scaling=4.0,
                                            embedding_multiplier=3.0, residual_multiplier=0.5,
                                            attention_multiplier=0.3, **ATTN),
        "phi3": lambda: tf.Phi3Config(intermediate_size=128, num_hidden_layers=2, **ATTN),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=V, max_position_embeddings=256, **IDS),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=256, bos_token_id=0, eos_token_id=0),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=V),
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64, vocab_size=V, max_position_embeddings=256),
        "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=V, new_decoder_architecture=True, num_kv_heads=2),
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **moe),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=64, **moe),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               head_dim=16, **moe),
        "olmoe": lambda: tf.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **moe),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, num_hidden_layers=3,
            intermediate_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=V, max_position_embeddings=256, **IDS),
        "mamba": lambda: tf.MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                                        time_step_rank=8, vocab_size=V),
        "mamba2": lambda: tf.Mamba2Config(hidden_size=64, state_size=16, num_hidden_layers=2, expand=2,
                                          num_heads=8, head_dim=16, n_groups=1, chunk_size=16, vocab_size=V),
        "jamba": lambda: tf.JambaConfig(num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                                        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                                        mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8,
                                        use_mamba_kernels=False, intermediate_size=64, num_hidden_layers=2,
                                        **ATTN),
        "bamba": lambda: tf.BambaConfig(num_hidden_layers=2, attn_layer_indices=[1], mamba_n_heads=8,
                                        mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_expand=2,
                                        mamba_chunk_size=16, intermediate_size=128, **ATTN),
        "falcon_h1": lambda: tf.FalconH1Config(num_hidden_layers=2, mamba_n_heads=8, mamba_d_head=16,
                                               mamba_n_groups=1, mamba_d_state=16, mamba_expand=2, mamba_d_ssm=128,
                                               mamba_chunk_size=16, intermediate_size=128, head_dim=16,
                                               lm_head_multiplier=0.5, **ATTN),
        # Two hybrid layers and one memory block: layer 2's shared transformer is tied to layer 1's
        # (stored once, under layer 1), each with its own adapters (attention and MLP) inside it. Init
        # range 0.2: logits far from uniform, so perplexity shows whether layer 2 saw the pruned block.
        "zamba2": lambda: tf.Zamba2Config(num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "hybrid"],
                                          mamba_d_state=16, mamba_headdim=16, mamba_ngroups=1, n_mamba_heads=8,
                                          num_mem_blocks=1, intermediate_size=128, use_mem_rope=True,
                                          use_shared_attention_adapter=True, adapter_rank=8, initializer_range=0.2,
                                          # the adapters add to q/k/v at the concatenated width (2 x hidden),
                                          # as in the released models: heads x head_dim must match it
                                          attention_head_dim=32, **{**ATTN, "num_key_value_heads": 4}),
    }[arch]()
    return c


ARCHS = ("llama", "qwen3", "gemma2", "gemma3_text", "gemma3", "cohere", "granite", "phi3", "gpt_neox", "gpt2", "bloom",
         "opt", "falcon", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "mamba", "mamba2",
         "jamba", "bamba", "falcon_h1", "zamba2")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "jamba")


def write(arch: str, folder: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a router bias that changes routing
                buf.copy_(torch.linspace(-1, 1, buf.numel()))
    return save(model, folder, tokenizer_dir)


def save(model, folder: Path, tokenizer_dir: Path) -> Path:
    """`save_pretrained` plus SmolLM2's tokenizer files: a model folder the job can read."""
    model.save_pretrained(folder)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, Path(folder) / f.name)
    return Path(folder)
