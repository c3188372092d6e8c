"""The miniature world: procedural scenes, an exact analytic judge, and world metrics.

Small light-background images of one or two coloured shapes ("a red circle on the left", "a
blue square above a yellow triangle") rendered from a seed (`world`), read back from pixels
without learning (`judge`), and scored (`metrics`: per-attribute alignment accuracy and a
Fréchet-distance quality proxy). A declared set of compositions is held out of training so
alignment can be measured on prompts a model never saw.

    ds = WorldDataset(1000, seed=0, split="train")        # dict(image, caption, scene)
    report = alignment_report(generated_images, heldout_prompts())
"""

from .judge import Detection, degrade, features, judge_accuracy, judge_scene, read_image, relation_of
from .metrics import alignment_report, feature_matrix, frechet_distance, quality_proxy
from .world import (
    COLOURS,
    HELDOUT_PAIRINGS,
    HELDOUT_TRIPLES,
    POSITIONS,
    RELATIONS,
    SHAPES,
    Scene,
    WorldDataset,
    WorldObject,
    caption,
    composition_key,
    export_image_folder,
    heldout_prompts,
    heldout_scenes,
    heldout_specs,
    heldout_violations,
    is_heldout,
    parse_prompt,
    place_scene,
    prompt,
    sample_dataset,
    train_scenes,
)

__all__ = [
    "COLOURS", "HELDOUT_PAIRINGS", "HELDOUT_TRIPLES", "POSITIONS", "RELATIONS", "SHAPES",
    "Detection", "Scene", "WorldDataset", "WorldObject",
    "alignment_report", "caption", "composition_key", "degrade", "export_image_folder",
    "feature_matrix", "features", "frechet_distance", "heldout_prompts", "heldout_scenes",
    "heldout_specs", "heldout_violations", "is_heldout", "judge_accuracy", "judge_scene",
    "parse_prompt", "place_scene", "prompt", "quality_proxy", "read_image", "relation_of",
    "sample_dataset", "train_scenes",
]
