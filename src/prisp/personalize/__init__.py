"""Stage 2: per-user personalization strategies (PRISP, OPPU, ablations) over one training loop."""

from prisp.personalize.hyperparams import PRISP_TABLE7, TASK_ADAPTATION, personalization_hyperparams
from prisp.personalize.personalizer import PersonalizeConfig, PersonalizeResult, personalize, stack_loras
from prisp.personalize.strategies import STRATEGIES, Strategy, get_strategy
from prisp.personalize.task_adapt import TaskAdaptResult, task_adapt

__all__ = [
    "PRISP_TABLE7",
    "STRATEGIES",
    "TASK_ADAPTATION",
    "PersonalizeConfig",
    "PersonalizeResult",
    "Strategy",
    "TaskAdaptResult",
    "get_strategy",
    "personalization_hyperparams",
    "personalize",
    "stack_loras",
    "task_adapt",
]
