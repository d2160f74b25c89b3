"""The names other tools rely on (docs/design.md's contract): MLflow tags, and the attributes each
Optuna trial and study carries. One home, so no module writes them out by hand."""

# MLflow's own tags
NOTE = "mlflow.note.content"  # the run's "Description" in the UI (markdown)
RUN_NAME = "mlflow.runName"
PARENT_RUN_ID = "mlflow.parentRunId"
SOURCE_NAME, SOURCE_TYPE = "mlflow.source.name", "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"
EXPERIMENT_KIND = "mlflow.experimentKind"
# The value MLflow 3.17's UI uses for model training (against "genai_development"): with it the
# experiment's header and tabs are those of model training.
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"

# The project's tags
ROLE, STATE, REASON, VARIANT = "fractal.role", "fractal.state", "fractal.reason", "fractal.variant"
MODEL_URI, CONFIG_SHA, REPRODUCES = "fractal.model_uri", "fractal.config_sha256", "fractal.reproduces"
BEST_RUN_ID, BEST_VARIANT = "fractal.best_run_id", "fractal.best_variant"
PARETO_FRONT = "fractal.pareto_front"  # multi-objective study run: the front's variants
PARETO_ARTIFACT = "pareto_front.csv"  # ... and the front with its objectives' values
RUNG = "fractal.rung"  # halving: the last rung a waiting trial finished
# The run artifact a trial continues from (Tracker.save_checkpoint)
CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "checkpoint.pt"
LEGACY_CHECKPOINT_DIRS = ("halving",)  # where 0.1 kept a halving rung's state
STUDY_NAME, TRIAL_NUMBER = "optuna.study_name", "optuna.trial_number"

# Optuna trial user attributes
RUN_ID_ATTR = "mlflow_run_id"
VARIANT_ATTR = "variant"
REASON_ATTR = "reason"
PARAM_COUNT_ATTR = "param_count"
WORKER_ATTR, HEARTBEAT_ATTR = "worker", "heartbeat"  # who trains it, and when it last said so
RUNG_ATTR, RUNG_DONE_ATTR = "rung", "rung_done"  # halving: the rung it trains, the last finished
# Optuna study user attributes
PARENT_RUN_ATTR = "mlflow_parent_run_id"
CONFIG_SHA_ATTR = "config_sha256"
GRID_SIZE_ATTR = "grid_size"
# who writes the report of the finished grid: {"worker", "heartbeat", "trials"} (claims.take_report)
REPORTER_ATTR = "reporter"
