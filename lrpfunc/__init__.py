"""lrpfunc: layer-wise relevance propagation and other modified gradients as pure torch.func functions."""

from . import canonizers, composites, evaluate, ops, rules, types
from ._attribute import attribute, attribute_with_params, rule_table
from ._attributors import integrated_gradients, occlusion, smooth_grad
from ._basic import ParamMod
from ._call import Call, Propagated, RuleError
from ._checks import ParamsRequireGradWarning, TrainingModeWarning
from ._composite import CallSite, RuleTable
from ._conservation import ConservationReport, SiteRelevance, conservation
from ._layers import attribute_layers
from ._plan import Plan, cached, compile, export  # noqa: A004  # lrpfunc.compile, as torch.compile
from ._stabilize import Stabilizer, stabilize
from ._targets import from_logit

__all__ = [
    "attribute",
    "cached",
    "compile",
    "export",
    "Plan",
    "attribute_with_params",
    "attribute_layers",
    "rule_table",
    "from_logit",
    "conservation",
    "ConservationReport",
    "SiteRelevance",
    "integrated_gradients",
    "smooth_grad",
    "occlusion",
    "ParamMod",
    "Call",
    "CallSite",
    "Propagated",
    "RuleError",
    "TrainingModeWarning",
    "ParamsRequireGradWarning",
    "RuleTable",
    "Stabilizer",
    "stabilize",
    "canonizers",
    "composites",
    "evaluate",
    "ops",
    "rules",
    "types",
]

__version__ = "0.3.0"
