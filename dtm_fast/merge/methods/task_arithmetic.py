"""Task arithmetic (Ilharco et al. 2023): y = b + lambda * sum_i w_i (x_i - b)."""

from dtm_fast.merge.methods.gta import GeneralizedTaskArithmetic


class TaskArithmetic(GeneralizedTaskArithmetic):
    name = "task_arithmetic"
    summary = "base + lambda * weighted sum of task vectors"
