"""Lumina Region Grid: Lumina-Next's compositional demo in one node, a grid of regions each drawn from its own caption.

It encodes the captions as the demo does (each cell's caption, the global caption = the captions joined by " ", the
negative) and returns standard area conditioning (one ConditioningSetAreaPercentage entry per cell, row-major) that
carries the global caption for adaLN; any sampler with a Lumina-T2I or Lumina-Next MODEL then runs the grid in one
forward per step (nodes/regions.py).
"""

from __future__ import annotations

from lumina_core import families

from . import text_encoder_handle
from .common import TEXT_ENCODER_TYPE, make_conditioning
from .regions import GLOBAL_CAPTION_KEY

MAX_CELLS_PER_SIDE = 8
# The first example of the original demo: a 2x2 grid of these four captions.
DEMO_CAPTIONS = (
    "A full moon hanging in the sky.\n"
    "A small river meanders by, sparkling with light.\n"
    "An old house with old brick walls.\n"
    "A huge cherry tree with pink cherry blossoms."
)


def grid_captions(text: str) -> list[str]:
    """The cell captions of the node's text: one per non-empty line, row-major."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def cell_area(row: int, column: int, rows: int, columns: int) -> tuple:
    """ComfyUI's percentage area ("percentage", height, width, y, x) of a grid cell."""
    return ("percentage", 1.0 / rows, 1.0 / columns, row / rows, column / columns)


def _side_input(what: str):
    return ("INT", {"default": 2, "min": 1, "max": MAX_CELLS_PER_SIDE, "step": 1,
                    "tooltip": f"Number of {what} of the grid (the original's NxM grids: columns x rows)."})


class LuminaRegionGrid:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER_TYPE, {"tooltip": "From Lumina Load Text Encoder: Gemma-2B for "
                                 "Lumina-Next (LLaMA-2-7B for Lumina-T2I also works, an extension of the original)."}),
                "rows": _side_input("rows"),
                "columns": _side_input("columns"),
                "captions": ("STRING", {"multiline": True, "default": DEMO_CAPTIONS, "tooltip": "One caption per "
                             "cell, one per line, row by row (left to right, then top to bottom): rows x columns "
                             "lines. Empty lines are skipped."}),
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "The negative prompt (empty "
                             "as the original's default)."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = (
        "One area entry per cell (ConditioningSetAreaPercentage's form) with the global caption for adaLN: the "
        "positive of the Lumina Sampler, KSampler or a guider.",
        "The negative prompt with the global caption for adaLN, as the original (its unconditional branch is "
        "conditioned on the global caption too); a plain Lumina Text Encode negative works as well.",
    )
    FUNCTION = "encode"
    CATEGORY = "Lumina/conditioning"
    DESCRIPTION = (
        "Compositional generation as Lumina-Next's demo: the image is split into a rows x columns grid, each cell "
        "drawn from its own caption (its image tokens attend only to that caption), the whole conditioned on the "
        "captions joined. Cells are numbered row-major (the original's numbering repeats a caption in grids of "
        "more than one row and column)."
    )

    def encode(self, text_encoder, rows, columns, captions, negative):
        family = getattr(text_encoder.encoder, "family", None)
        dit = families.get_family(family or "lumina_t2i")
        if not hasattr(dit.dit_class(), "prepare_regions"):
            raise ValueError(
                f"{dit.title}'s {dit.dit_title} has no caption cross-attention to restrict by region: Lumina Region "
                f"Grid needs the text encoder of Lumina-Next (Gemma-2B) or Lumina-T2I (LLaMA-2-7B)."
            )
        cells = grid_captions(captions)
        if len(cells) != rows * columns:
            raise ValueError(
                f"Lumina Region Grid: a {rows} x {columns} grid takes {rows * columns} captions, one per line, but "
                f"the captions hold {len(cells)} non-empty lines. Add or remove lines, or change rows and columns."
            )

        def encode(text):
            return text_encoder_handle.encode_text(text_encoder, text)

        global_caption = encode(" ".join(cells))
        positive = []
        for index, caption in enumerate(cells):
            [[features, extras]] = make_conditioning(*encode(caption), prompt=caption, family=family)
            extras.update(area=cell_area(index // columns, index % columns, rows, columns), strength=1.0,
                          set_area_to_bounds=False)
            extras[GLOBAL_CAPTION_KEY] = global_caption
            positive.append([features, extras])
        uncond = make_conditioning(*encode(negative), prompt=negative, family=family)
        uncond[0][1][GLOBAL_CAPTION_KEY] = global_caption
        return (positive, uncond)
