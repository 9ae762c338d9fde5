"""The model-family registry: each record fits its transformer, and no other module names a family."""

import ast
import json
from pathlib import Path

import pytest

import emag
from emag.families import DIT, FAMILIES, SD3, family_named, family_of, family_of_pipeline, family_of_transformer_config
from emag.guidance.base import Setup
from emag.guidance.perturbation import resolve_layers
from emag.guidance.registry import METHODS
from tiny_models import (tiny_dit_transformer, tiny_flux_transformer, tiny_pixart_transformer, tiny_sana_transformer,
                         tiny_sd3_transformer, tiny_wan_transformer)

TINY = {"sd3": lambda: tiny_sd3_transformer(num_layers=6), "dit": lambda: tiny_dit_transformer(num_layers=6),
        "flux": lambda: tiny_flux_transformer(num_layers=2, num_single_layers=4),
        "pixart": lambda: tiny_pixart_transformer(num_layers=6), "sana": lambda: tiny_sana_transformer(num_layers=6),
        "wan": lambda: tiny_wan_transformer(num_layers=6)}
BACKBONE_OPTIONS = {"dit": {"scheduler": None}, "flux": {"guidance": 3.5}}
SRC = Path(emag.__file__).parent
# the modules that are a family's by nature: its registry module, its pipeline, the bundled DiT, and the
# EMAG presets (the published settings of each family's reference models)
OWNERS = ("families/", "pipelines/sd3.py", "pipelines/dit.py", "pipelines/flux.py", "pipelines/pixart.py", "pipelines/sana.py", "pipelines/wan.py", "digits/", "guidance/emag/config.py")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_record_fits_its_transformer(name, tmp_path):
    family = FAMILIES[name]
    tr = TINY[name]()
    assert family_of(tr) is family and family_named(name) is family
    assert family.num_blocks(tr) == 6
    for layer in range(6):  # every block has the attention module the record names
        blist, _ = family.locate(layer, family.block_counts(tr))
        assert family.attention_module(tr, layer) is getattr(family.blocks(tr)[layer], blist.attention_attr)
    tr.save_config(tmp_path)
    assert family_of_transformer_config(json.loads((tmp_path / "config.json").read_text())) is family
    assert all(family_of_pipeline(c) is family for c in family.pipeline_classes)
    assert family.pipeline_class().family is family  # the pipeline the record names serves this family
    assert family.backbone_of(tr, **BACKBONE_OPTIONS.get(name, {})).num_blocks == 6


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_method_has_default_layers_inside_any_model(name):
    """Each layered method's default (a fixed tuple for the reference model, or a band of the block
    count) resolves on the reference model; bands stay inside a shallow model."""
    family = FAMILIES[name]
    layered = [m for m in METHODS if "layers" in {f.name for f in METHODS[m].config.__dataclass_fields__.values()}]
    assert {"pag", "seg", "sag", "erg", "s2", "slg", "stg", "tpg", "emag"} <= set(layered)
    for method in layered:
        if method in family.undefined_methods:  # refused on this family, with the reason
            assert family.default_layers(method) is None
            continue
        if method == "emag":
            assert family.default("emag", "layers")
            continue
        d = family.default_layers(method)
        assert d is not None, (name, method)
        ref = family.reference_counts
        full = resolve_layers(None, Setup(family, sum(ref), 10, 1, block_counts=ref), method, method)
        assert full and max(full) < sum(ref)
        if callable(d):
            small = (4,) * len(ref)
            small = resolve_layers(None, Setup(family, sum(small), 10, 1, block_counts=small), method, method)
            assert small and max(small) < 4 * len(ref)


def test_presets_are_built_from_the_families_defaults():
    for name, family in (("sd3-medium", SD3), ("dit-xl-2", DIT)):
        e, d = emag.EMAG.preset(name), family.defaults["emag"]
        assert (e.scale, e.layers, e.ema_dtype, e.ema_window, e.apply_window) == \
            (d["scale"], d["layers"], d["ema_dtype"], d["ema_window"], d["apply_window"])
    assert emag.EMAG.preset("dit-xl-2-additive").apply_window == DIT.defaults["emag"]["additive_apply_window"]


def test_no_other_module_names_a_family():
    """Family names, their records and their transformer classes appear in code only in the modules that
    are the family's (above); everything else asks the registry (prose in docstrings and messages aside)."""
    names = {f.name for f in FAMILIES.values()} | {f.transformer_class for f in FAMILIES.values()}
    records = {"SD3", "DIT", "FLUX", "PIXART", "SANA", "WAN"}
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(OWNERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{rel}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.Name) and node.id in records:
                offenders.append(f"{rel}:{node.lineno}: {node.id}")
            elif isinstance(node, ast.alias) and node.name in records:
                offenders.append(f"{rel}: imports {node.name}")
    assert offenders == []


def test_emag_models_lists_what_each_record_says():
    from click.testing import CliRunner

    from emag.cli import cli

    r = CliRunner().invoke(cli, ["models"])
    assert r.exit_code == 0, r.output
    for family in FAMILIES.values():
        assert f"{family.name} ({family.label}): {family.transformer_class}" in r.output
        for method in family.undefined_methods:
            assert f"not defined: {method} (" in r.output
    assert "double = transformer_blocks[i].attn (text first joint" in r.output
    assert "single = single_transformer_blocks[i].attn" in r.output
    assert "linear attention, untouched: attn2" in r.output  # Sana


def test_default_bands_stay_inside_a_one_block_model():
    """A 3-block middle band on a 1-block list keeps the one block (it used to fail on the negative index);
    an empty list is a clear error naming the lists."""
    from emag.families import FLUX

    assert SD3.default_layer_positions("seg", (1,), "SEG") == (0,)
    assert FLUX.default_layer_positions("seg", (1, 1), "SEG") == (0,)
    with pytest.raises(ValueError, match="default band has no block in this model .double: 0 blocks"):
        FLUX.default_layer_positions("seg", (0, 3), "SEG")
