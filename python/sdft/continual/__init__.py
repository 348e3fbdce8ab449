"""Continual-learning experiments: several methods, learning rates and seeds, trained through a
sequence of stages, every benchmark scored on the base model and after every stage.

    from sdft.continual import load_experiment, run_experiment
    experiment = load_experiment("examples/continual/experiment.yaml")
    run_experiment(experiment, parallel=2)

``sdft continual EXPERIMENT.yaml`` is the command-line form; ``sdft validate EXPERIMENT.yaml
--deep`` checks an experiment without training.
"""

from sdft.continual.runner import (
    ExperimentFailed,
    ExperimentResult,
    ExperimentRunner,
    StageStartService,
    result_rows,
    run_experiment,
    write_outputs,
    write_results,
)
from sdft.continual.spec import (
    BenchmarkSpec,
    Chain,
    Experiment,
    ExperimentError,
    ExperimentSpec,
    StageRun,
    is_experiment_file,
    load_experiment,
    parse_experiment,
)

__all__ = [
    "BenchmarkSpec",
    "Chain",
    "Experiment",
    "ExperimentError",
    "ExperimentFailed",
    "ExperimentResult",
    "ExperimentRunner",
    "ExperimentSpec",
    "StageRun",
    "StageStartService",
    "is_experiment_file",
    "load_experiment",
    "parse_experiment",
    "result_rows",
    "run_experiment",
    "write_outputs",
    "write_results",
]
