"""Class lists of standard segmentation benchmarks, and the label-offset convention for them."""


class BackgroundOffset:
    """For label sets with ``names`` and ``background``: with background, label 0 is background
    (it gets no prompt), so prompted class j is label j + offset."""

    names: list[str]
    background: bool

    @property
    def offset(self) -> int:
        return 1 if self.background else 0

    @property
    def fg_names(self) -> list[str]:
        return self.names[self.offset :]


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# The 20 VOC object classes, without background (the "VOC20" benchmark ignores background pixels).
VOC20_CLASSES = VOC_CLASSES[1:]

# PASCAL Context, the 59 most frequent classes (mmsegmentation's PascalContextDataset59 order).
CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
CONTEXT60_CLASSES = ("background", *CONTEXT59_CLASSES)

# COCO's 80 thing categories in category-id order (the names of instances_*.json).
COCO_THING_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# Their COCO category ids (ids 1..90 with ten unused).
COCO_THING_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
COCO_OBJECT_CLASSES = ("background", *COCO_THING_CLASSES)

# COCO-Stuff's 91 stuff categories, ids 92..182 (the names of stuff_*.json, without "other").
COCO_STUFF_ONLY_CLASSES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)
COCO_STUFF_IDS = tuple(range(92, 183))
# COCO-Stuff 171: things then stuff; label i is the i-th used category id in id order.
COCO_STUFF_CLASSES = (*COCO_THING_CLASSES, *COCO_STUFF_ONLY_CLASSES)
COCO_STUFF_171_IDS = (*COCO_THING_IDS, *COCO_STUFF_IDS)

# Cityscapes' 19 evaluation classes in trainId order.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
# labelId -> trainId for the 19 classes (every other labelId is ignored).
CITYSCAPES_ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# ADE20K SceneParsing, 150 classes (ADEChallengeData2016; mask value v is class v - 1, 0 is "other").
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

# Built-in class lists by benchmark name (`tasks.classes: <name>`), with whether label 0 is background.
BENCHMARKS: dict[str, tuple[tuple[str, ...], bool]] = {
    "voc21": (VOC_CLASSES, True),
    "voc20": (VOC20_CLASSES, False),
    "context60": (CONTEXT60_CLASSES, True),
    "context59": (CONTEXT59_CLASSES, False),
    "coco-object": (COCO_OBJECT_CLASSES, True),
    "coco-stuff": (COCO_STUFF_CLASSES, False),
    "cityscapes": (CITYSCAPES_CLASSES, False),
    "ade20k": (ADE20K_CLASSES, False),
}

# Readable prompt words for dataset names that are run together or abbreviated.
PROMPT_NAMES = {
    "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
    "building-other": "building", "ceiling-other": "ceiling", "desk-stuff": "desk", "door-stuff": "door",
    "floor-other": "floor", "food-other": "food", "furniture-other": "furniture",
    "ground-other": "ground", "mirror-stuff": "mirror", "plant-other": "plant", "sky-other": "sky",
    "solid-other": "solid", "structural-other": "structure", "textile-other": "textile",
    "water-other": "water", "window-other": "window", "playingfield": "playing field",
    "waterdrops": "water drops", "floor-marble": "marble floor", "floor-stone": "stone floor",
    "floor-tile": "tile floor", "floor-wood": "wood floor", "wall-brick": "brick wall",
    "wall-concrete": "concrete wall", "wall-other": "wall", "wall-panel": "wall panel",
    "wall-stone": "stone wall", "wall-tile": "tile wall", "wall-wood": "wood wall",
    "window-blind": "window blind", "ceiling-tile": "ceiling tile", "tv": "television",
}


def prompt_name(name: str) -> str:
    """The word put into prompt templates for a class label (readable form of dataset names)."""
    return PROMPT_NAMES.get(name, name)
