"""SAM 2's point-label codes, defined once (no JAX import: the data pipeline uses them too).

A click is positive (1) or negative (0); a box is fed as its two corners with labels 2 (top left) and 3
(bottom right); -1 pads a prompt to a static number of points (the prompt encoder's ``not_a_point``).
"""

LABEL_PAD = -1
LABEL_NEG = 0
LABEL_POS = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3
VALID_LABELS = (LABEL_PAD, LABEL_NEG, LABEL_POS, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT)
