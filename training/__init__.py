"""The student: a T5 trained multi-task on labels and teacher rationales (distilling step-by-step)."""
