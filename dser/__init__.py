"""dser: DeepSpeed-scaled parameter-efficient finetuning for speech emotion recognition."""

__version__ = "0.1.0"
