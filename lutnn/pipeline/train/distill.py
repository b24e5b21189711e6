"""Task loss plus optional logit knowledge distillation (Hinton et al.) from the dense teacher."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``; the ``T^2`` keeps gradient scale independent of T."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    log_target=True, reduction="batchmean") * (t * t)


def total_loss(student: Tensor, labels: Tensor, teacher: Tensor | None = None, weight: float = 0.0,
               temperature: float = 1.0, label_smoothing: float = 0.0) -> Tensor:
    """``(1 - w) * CE + w * KD``; plain cross-entropy when no teacher logits are given."""
    ce = F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing)
    if teacher is None or weight == 0.0:
        return ce
    return (1.0 - weight) * ce + weight * kd_loss(student, teacher, temperature)
