"""The model facts the demo page shows: variant, classes, where the weights came from (from config.json and the
folder's model card, README.md)."""

from __future__ import annotations

import re
from pathlib import Path

from ..hub.model_card import _describe_backbone
from ..inference.resolve import DEFAULT_MODEL_DIR
from ..releases import VARIANTS

DEMO_MODEL_WARNING = "trained on synthetic shapes; not a model for photographs"


def is_demo_model(model_dir: Path) -> bool:
    """Whether `model_dir` is the small demo model bundled with the package."""
    return Path(model_dir).resolve() == DEFAULT_MODEL_DIR.resolve()


def card_variant(card: str) -> str | None:
    """The official release named among the front matter's tags (`- fastinst-d3-r50`), if any."""
    front = card.split("---")[1] if card.startswith("---") and card.count("---") >= 2 else ""
    tags = set(re.findall(r"^- (\S+)$", front, flags=re.MULTILINE))
    return next((name for name in VARIANTS if name in tags), None)


def card_source(card: str) -> str | None:
    """The first sentence of the card's first paragraph about its weights (`render_model_card` writes "Weights
    converted from ...", the demo model's card "... trained from scratch ...")."""
    body = card.split("---", 2)[2] if card.startswith("---") and card.count("---") >= 2 else card
    paragraphs = [" ".join(p.split()) for p in body.split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
    about = [p for p in paragraphs if re.search(r"\bweights\b|\btrained\b", p, flags=re.IGNORECASE)]
    return about[0].split(". ")[0].rstrip(".") + "." if about else None


def model_line(model_dir: Path, variant: str | None) -> str:
    if is_demo_model(model_dir):
        return "**Model:** `default`, the demo model bundled with the package (`fastinst_hf.DEFAULT_MODEL`)"
    if variant:
        return f"**Model:** `{model_dir}`: official `{variant}` (COCO mask AP {VARIANTS[variant]['coco_val_ap']})"
    return f"**Model:** `{model_dir}`"


def card_facts(model_dir: Path, config) -> str:
    """Markdown lines for the page: model folder, variant, backbone, classes, weights' origin, and the warning when
    the bundled demo model is the one running."""
    readme = Path(model_dir) / "README.md"
    card = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    variant = card_variant(card)
    labels = [config.id2label[k] for k in sorted(config.id2label, key=int)]
    shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} in all)" if len(labels) > 12 else "")
    facts = [
        model_line(model_dir, variant),
        f"**Backbone:** {_describe_backbone(config)}; {config.decoder_layers} decoder layers, {config.num_queries} queries",
        f"**Classes ({len(labels)}):** {shown}",
        f"**Weights:** {card_source(card) or 'no model card (README.md) in the folder'}",
    ]
    if is_demo_model(model_dir):
        facts.insert(0, f"⚠️ **The embedded demo model is running: {DEMO_MODEL_WARNING}.**")
    return "\n".join(f"- {fact}" for fact in facts)
