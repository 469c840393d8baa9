"""stepwise: distilling step-by-step, from teacher rationales to a served student."""
