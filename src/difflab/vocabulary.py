"""The words of the generated "shapes" world: its attributes and their values, and the rows and
columns of the 3x3 grid that positions are named by.

Why a module of its own: the scene generator (``difflab.data.shape_scenes``), the caption
tokenizer (``difflab.nets.text``) and the attribute classifier (``difflab.nets.attributes``) all
need the same words, and networks import nothing from ``difflab.data``.
"""

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "big")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
POSITIONS = tuple(f"{row} {column}" for row in ROWS for column in COLUMNS)  # row-major
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
ANY_SHAPE = "shape"  # caption noun for an object whose shape is unspecified
