"""The merge recipe: one TOML file naming the base model, the LoRAs and every setting.

`load_recipe` reads and validates a file, `parse_recipe` validates an already-parsed
dict, and `apply_overrides` applies command-line overrides ("iterations", "calibration.steps")
to a validated recipe. Every problem raises `RecipeError` with a one-line message that
names the field by its TOML path (``lora[0].prompts``) or the file, the bad value and
what is expected. LoRA entries are numbered from 0, in file order.

Each dataclass field carries its help text in ``metadata["help"]``; `recipe_fields` lists
them all for the CLI's ``--help`` and the README.
"""

from ...settings import REQUIRED
from .example import example_recipe
from .overrides import apply_overrides
from .parse import load_recipe, parse_recipe
from .schema import FieldInfo, LoraSpec, Recipe, RecipeError, recipe_fields, recipe_to_dict

__all__ = [
    "RecipeError",
    "LoraSpec",
    "Recipe",
    "FieldInfo",
    "REQUIRED",
    "parse_recipe",
    "load_recipe",
    "apply_overrides",
    "recipe_fields",
    "recipe_to_dict",
    "example_recipe",
]
