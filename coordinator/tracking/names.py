"""The names gaggle gives things in MLflow, and the ids of queued tracking calls."""

EXPERIMENT = "gaggle"
REGISTERED_MODEL = "gaggle-router"
CHAMPION = "champion"
MODEL_NAME = "router"  # the logged model's name inside MLflow
TAG_OP = "gaggle.op_id"  # written on every object a replay creates, to recognise it later
TAG_VERSION = "gaggle.version_id"
TAG_EVAL_PREFIX = "eval."  # model version tags `eval.accuracy` (the mean), `eval.<task>`
TAG_EVAL_CONFIG = "gaggle.eval_config"  # key of the evaluation config behind the eval tags
TAG_STATUS = "gaggle.status"  # "rejected" on the run of a version that failed its checks
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
MAX_TAG_CHARS = 4000  # MLflow limits tag values; long expert lists are cut with a count


def expert_op(expert_id: str) -> str:
    """Queue id of an expert's run: one per expert, whatever replays it."""
    return f"expert:{expert_id}"


def version_op(version_id: str) -> str:
    """Queue id of a router version's registered model version."""
    return f"version:{version_id}"


def promotion_op(sequence: int, version_id: str) -> str:
    """Queue id of one promotion (the sequence tells repeated promotions apart)."""
    return f"promote:{sequence}:{version_id}"


def evaluation_op(version_id: str, config_key: str) -> str:
    """Queue id of a version's evaluation under one evaluation config."""
    return f"eval:{version_id}:{config_key}"


def rejection_op(version_id: str) -> str:
    """Queue id of the run that records a rejected router version."""
    return f"reject:{version_id}"
