"""hvdclip's benchmarks: hvdclip side by side with the alternatives, measured in one run.

`make bench` (or `python -m benchmarks` from the repository root) runs them; `runner` launches the
jobs, `worker` is one rank of a job, `loops` holds the training loops compared, `models` the
models and data, `variants` the comparison and its targets, `report` the arithmetic and tables.
"""

__all__: list[str] = []
