"""The recommender-user dialogue: environment, config, rewards, parsing and prompts."""

from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER, RecDialogEnv

__all__ = ["RECOMMENDER", "TURN_RECORD_KEY", "USER", "EnvConfig", "RecDialogEnv"]
