"""Teacher assessment (paper 1, Sec. 5, Alg. 4): the Sinkhorn score, the transferability
baselines it is compared with, and ranking-quality measures."""
from .score import (AssessmentResult, TeacherOutputs, assess_teachers, fit_linear_probe,
                    teacher_cost)

__all__ = ["AssessmentResult", "TeacherOutputs", "assess_teachers", "fit_linear_probe",
           "teacher_cost"]
