"""The merge methods. Adding one is one file plus one line in METHODS."""

from dtm_fast.merge.methods.arcee_fusion import ArceeFusion
from dtm_fast.merge.methods.base import MergeMethod
from dtm_fast.merge.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from dtm_fast.merge.methods.dare import DareLinear, DareTies
from dtm_fast.merge.methods.della import Della, DellaLinear
from dtm_fast.merge.methods.fisher import Fisher
from dtm_fast.merge.methods.karcher import Karcher
from dtm_fast.merge.methods.linear import Linear
from dtm_fast.merge.methods.model_stock import ModelStock
from dtm_fast.merge.methods.multislerp import Multislerp
from dtm_fast.merge.methods.nearswap import Nearswap
from dtm_fast.merge.methods.nuslerp import Nuslerp
from dtm_fast.merge.methods.passthrough import Passthrough
from dtm_fast.merge.methods.ram import Ram, RamPlusTensorLocal
from dtm_fast.merge.methods.sce import Sce
from dtm_fast.merge.methods.slerp import Slerp
from dtm_fast.merge.methods.task_arithmetic import TaskArithmetic
from dtm_fast.merge.methods.ties import Ties

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        Linear(), TaskArithmetic(), Ties(), DareLinear(), DareTies(), Breadcrumbs(), BreadcrumbsTies(),
        Slerp(), ModelStock(), Fisher(), Della(), DellaLinear(), Passthrough(), Sce(), Nuslerp(), Multislerp(),
        Karcher(), Nearswap(), Ram(), RamPlusTensorLocal(), ArceeFusion(),
    )
}

METHOD_NAMES = tuple(METHODS)
