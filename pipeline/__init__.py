"""Plain-torch core of the pruner: models, data, Hessians, solvers, calibration, evaluation, output.

No Ray in here: the Ray actors in `actors/` call these functions.
"""
