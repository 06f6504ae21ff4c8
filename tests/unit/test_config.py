"""Typed config tree: strict YAML loading, ``--set`` overrides, the validator and derived values
(the CLI and the stage presets: test_config_cli.py). Fast: no process groups, no megatron."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from megatron_emu.config import derived
from megatron_emu.config.io import ConfigError, apply_overrides, from_dict, load_config
from megatron_emu.config.validate import config_errors, validate
from megatron_emu.contracts import image_layout

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples/configs/emu2_tiny.yaml"
BIG = REPO / "examples/configs/emu2_37b.yaml"
TINY_WORLD = 4  # TP2 x PP2 x DP1


def tiny_dict() -> dict:
    return yaml.safe_load(TINY.read_text())


def config_error(fn, *args) -> list[str]:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert info.value.errors, "ConfigError without messages"
    for msg in info.value.errors:
        assert msg in str(info.value)
    return info.value.errors


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- presets


def test_presets_load_and_validate_clean():
    big = load_config(BIG, ["parallel.data_parallel_size=8"])
    assert config_errors(big, world_size=256) == []
    assert validate(big, 256) is big
    tiny = load_config(TINY)
    assert config_errors(tiny, world_size=TINY_WORLD) == []
    assert config_errors(tiny) == []


def test_37b_preset_matches_emu2_spec():
    cfg = load_config(BIG)
    v, lm = cfg.model.vision, cfg.model.lm
    assert (v.image_size, v.patch_size, v.width, v.num_layers, v.num_heads, v.mlp_dim) == (
        448, 14, 1792, 64, 16, 15360)
    assert (v.layer_norm_eps, v.postnorm, v.qkv_bias) == (1e-6, True, "qv")
    assert cfg.model.adapter.n_query == 64
    assert (lm.vocab_size, lm.hidden_size, lm.num_layers, lm.num_attention_heads) == (
        32272, 6656, 60, 52)
    assert lm.num_query_groups is None  # MHA (52 / 52)
    assert (lm.ffn_hidden_size, lm.norm_eps, lm.rope_theta, lm.max_position_embeddings) == (
        17920, 1e-6, 10000.0, 2048)
    assert derived.padded_vocab_size(lm) == 32384
    assert derived.patch_grid(v) == 32
    assert image_layout.tokens_per_image(cfg.model.adapter.n_query) == 66  # [IMG] + 64 <image> + [/IMG]
    assert derived.vision_seq_length(v) == 1025


# --------------------------------------------------------------------------- strict loading


def _del(path: str):
    def edit(d):
        *parents, leaf = path.split(".")
        for p in parents:
            d = d[p]
        del d[leaf]
    return edit


def _set(path: str, value):
    def edit(d):
        *parents, leaf = path.split(".")
        for p in parents:
            d = d[p]
        d[leaf] = value
    return edit


@pytest.mark.parametrize("edit, expected", [
    pytest.param(_set("model.lm.foo", 1), ["model.lm.foo", "unknown key"], id="unknown-nested-key"),
    pytest.param(_set("bogus", {}), ["bogus", "unknown key"], id="unknown-top-key"),
    pytest.param(_set("model.lm.num_layers", "sixty"), ["model.lm.num_layers", "int", "str"],
                 id="str-for-int"),
    pytest.param(_set("model.lm.num_layers", True), ["model.lm.num_layers", "int", "bool"],
                 id="bool-for-int"),
    pytest.param(_set("model.vision.qkv_bias", "kqv"), ["model.vision.qkv_bias", "kqv"],
                 id="invalid-literal"),
    pytest.param(_set("train.recompute_granularity", "most"), ["train.recompute_granularity"],
                 id="invalid-optional-literal"),
    pytest.param(_set("train.freeze", "vision.*"), ["train.freeze", "list"], id="str-for-list"),
    pytest.param(_set("model.lm.hidden_size", None), ["model.lm.hidden_size"], id="null-for-int"),
    pytest.param(_del("model.lm.hidden_size"), ["model.lm.hidden_size", "missing required"],
                 id="missing-required-field"),
    pytest.param(_set("model.vision", 5), ["model.vision", "mapping"], id="section-not-mapping"),
])
def test_strict_loading_names_the_dotted_path(tmp_path, edit, expected):
    data = tiny_dict()
    edit(data)
    errors = config_error(load_config, write_yaml(tmp_path, data))
    assert len(errors) == 1, errors
    for part in expected:
        assert part in errors[0], errors


def test_missing_section_reports_its_required_fields(tmp_path):
    data = tiny_dict()
    del data["model"]["vision"]
    errors = config_error(load_config, write_yaml(tmp_path, data))
    for name in ("image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim"):
        assert any(f"model.vision.{name}" in e and "missing" in e for e in errors), errors
    assert not any("layer_norm_eps" in e for e in errors)  # defaulted fields are not required


def test_all_problems_reported_at_once(tmp_path):
    data = tiny_dict()
    data["model"]["lm"]["foo"] = 1
    data["model"]["lm"]["num_layers"] = "sixty"
    del data["model"]["lm"]["hidden_size"]
    data["train"]["lr"] = "fast"
    errors = config_error(load_config, write_yaml(tmp_path, data), ["parallel.nope=1"])
    for name in ("model.lm.foo", "model.lm.num_layers", "model.lm.hidden_size", "train.lr",
                 "parallel.nope"):
        assert any(name in e for e in errors), (name, errors)
    assert len(errors) == 5, errors


def test_from_dict_roundtrips_the_preset():
    data = tiny_dict()
    cfg = from_dict(copy.deepcopy(data))
    assert cfg == load_config(TINY)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)


# --------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize("item, expected", [
    pytest.param("train.lr=abc", ["train.lr", "float"], id="type-checked"),
    pytest.param("train.micro_batch_size=2.5", ["train.micro_batch_size", "int"],
                 id="float-for-int"),
    pytest.param("train.nope=1", ["train.nope", "unknown"], id="unknown-leaf"),
    pytest.param("modle.lm.hidden_size=8", ["modle", "unknown"], id="unknown-section"),
    pytest.param("train.lr.x=1", ["train.lr", "not a section"], id="non-section-path"),
    pytest.param("train.lr", ["train.lr", "dotted.key=value"], id="no-equals"),
    pytest.param("train.freeze=[a", ["train.freeze", "YAML"], id="bad-yaml-value"),
    pytest.param("model.vision.qkv_bias=qqq", ["model.vision.qkv_bias"], id="invalid-literal"),
])
def test_bad_override_fails_naming_the_key(item, expected):
    errors = config_error(load_config, TINY, [item])
    assert len(errors) == 1, errors
    for part in expected:
        assert part in errors[0], errors


def test_valid_overrides_apply():
    cfg = load_config(TINY, [
        "train.micro_batch_size=4",
        "train.lr=0.0001",
        "train.min_lr=0",  # an int for a float field is accepted and converted
        "checkpoint.dir=null",
        "train.freeze=['vision.*', 'adapter.*']",
        "train.recompute_granularity=full",
        "model.vision.postnorm=false",
        "data.path=[]",
        "run.dir=a=b",  # only the first '=' separates key and value
    ])
    assert cfg.train.micro_batch_size == 4
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.min_lr == 0.0 and isinstance(cfg.train.min_lr, float)
    assert cfg.checkpoint.dir is None
    assert cfg.train.freeze == ["vision.*", "adapter.*"]
    assert cfg.train.recompute_granularity == "full"
    assert cfg.model.vision.postnorm is False
    assert cfg.data.path == []
    assert cfg.run.dir == "a=b"
    # Later items win; a section absent from the file is created.
    data = apply_overrides({}, ["train.seed=1", "train.seed=2"])
    assert data == {"train": {"seed": 2}}


def test_override_float_in_exponent_notation():
    assert load_config(TINY, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_override_into_empty_yaml_section(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY.read_text() + "\ndata:\n")
    assert load_config(path, ["data.num_workers=0"]).data.num_workers == 0


# --------------------------------------------------------------------------- validator rules

# (overrides on the tiny preset, world size, names that must appear in one message).
# Every case fires exactly one rule unless marked `several`.
RULES = [
    ("tp-lm-heads", ["parallel.tensor_model_parallel_size=3"], None,
     ["parallel.tensor_model_parallel_size", "model.lm.num_attention_heads"]),
    ("tp-vit-heads", ["parallel.tensor_model_parallel_size=4", "model.vision.num_heads=6",
                      "model.vision.width=96", "model.lm.num_attention_heads=8"], 8,
     ["parallel.tensor_model_parallel_size", "model.vision.num_heads"]),
    ("tp-lm-ffn", ["model.lm.ffn_hidden_size=129"], 4,
     ["parallel.tensor_model_parallel_size", "model.lm.ffn_hidden_size"]),
    ("tp-vit-mlp", ["model.vision.mlp_dim=129"], 4,
     ["parallel.tensor_model_parallel_size", "model.vision.mlp_dim"]),
    ("tp-padded-vocab", ["model.lm.make_vocab_size_divisible_by=127"], 4,
     ["parallel.tensor_model_parallel_size", "model.lm.make_vocab_size_divisible_by"]),
    ("tp-query-groups", ["model.lm.num_query_groups=1"], 4,
     ["parallel.tensor_model_parallel_size", "model.lm.num_query_groups"]),
    ("query-groups-divide-heads", ["model.lm.num_query_groups=6"], 4,
     ["model.lm.num_query_groups", "model.lm.num_attention_heads"]),
    ("sp-needs-tp", ["parallel.tensor_model_parallel_size=1"], 2,
     ["parallel.sequence_parallel", "parallel.tensor_model_parallel_size"]),
    ("sp-seq-divisible", ["train.seq_length=65"], 4,
     ["train.seq_length", "parallel.tensor_model_parallel_size"]),
    ("world-divisible-by-mp", [], 6,
     ["parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"]),
    ("dp-product", ["parallel.data_parallel_size=2"], 4, ["parallel.data_parallel_size"]),
    ("layers-divisible-by-pp", ["model.lm.num_layers=5"], 4,
     ["model.lm.num_layers", "parallel.pipeline_model_parallel_size"]),
    ("layers-divisible-by-pp-x-vpp", ["parallel.virtual_pipeline_model_parallel_size=4",
                                      "parallel.batch_p2p_comm=false"], 4,
     ["model.lm.num_layers", "parallel.pipeline_model_parallel_size"]),
    ("first-stage-split", ["parallel.num_layers_in_first_pipeline_stage=4"], 4,
     ["parallel.num_layers_in_first_pipeline_stage", "model.lm.num_layers"]),
    ("first-stage-uneven", ["parallel.tensor_model_parallel_size=1",
                            "parallel.sequence_parallel=false",
                            "parallel.pipeline_model_parallel_size=4",
                            "parallel.num_layers_in_first_pipeline_stage=2"], 4,
     ["parallel.num_layers_in_first_pipeline_stage", "model.lm.num_layers"]),
    ("first-stage-pp1", ["parallel.pipeline_model_parallel_size=1",
                         "parallel.num_layers_in_first_pipeline_stage=2"], 2,
     ["parallel.num_layers_in_first_pipeline_stage", "parallel.pipeline_model_parallel_size"]),
    ("first-stage-vpp", ["parallel.virtual_pipeline_model_parallel_size=2",
                         "parallel.batch_p2p_comm=false",
                         "parallel.num_layers_in_first_pipeline_stage=2"], 4,
     ["parallel.num_layers_in_first_pipeline_stage",
      "parallel.virtual_pipeline_model_parallel_size"]),
    ("vpp-pp2-batch-p2p", ["parallel.virtual_pipeline_model_parallel_size=2"], 4,
     ["parallel.batch_p2p_comm", "parallel.pipeline_model_parallel_size"]),
    ("vpp-needs-pp", ["parallel.pipeline_model_parallel_size=1",
                      "parallel.virtual_pipeline_model_parallel_size=2"], 2,
     ["parallel.virtual_pipeline_model_parallel_size", "parallel.pipeline_model_parallel_size"]),
    ("vpp-at-least-2", ["parallel.virtual_pipeline_model_parallel_size=1",
                        "parallel.batch_p2p_comm=false"], 4,
     ["parallel.virtual_pipeline_model_parallel_size"]),
    ("global-batch", ["train.global_batch_size=7"], 4,
     ["train.global_batch_size", "train.micro_batch_size"]),
    ("global-batch-with-dp", ["train.global_batch_size=6"], 8,
     ["train.global_batch_size", "train.micro_batch_size"]),
    ("interleaved-microbatches", ["parallel.virtual_pipeline_model_parallel_size=2",
                                  "parallel.batch_p2p_comm=false", "train.global_batch_size=6"], 4,
     ["train.global_batch_size", "parallel.pipeline_model_parallel_size"]),
    ("n-query-square", ["model.adapter.n_query=8"], 4, ["model.adapter.n_query", "square"]),
    ("grid-poolable", ["model.adapter.n_query=9"], 4, ["model.adapter.n_query", "pooled"]),
    ("image-multiple-of-patch", ["model.vision.image_size=60"], 4,
     ["model.vision.image_size", "model.vision.patch_size"]),
    ("width-divisible-by-heads", ["model.vision.width=66"], 4,
     ["model.vision.width", "model.vision.num_heads"]),
    ("lm-hidden-divisible-by-heads", ["model.lm.hidden_size=66"], 4,
     ["model.lm.hidden_size", "model.lm.num_attention_heads"]),
    ("vocab-holds-special-ids", ["model.lm.vocab_size=32002"], 4, ["model.lm.vocab_size"]),
    ("seq-within-max-pos", ["train.seq_length=512"], 4,
     ["train.seq_length", "model.lm.max_position_embeddings"]),
    ("seq-holds-an-image", ["train.seq_length=4"], 4, ["train.seq_length"]),
    ("ce-ignore-unknown", ["model.loss.ce_ignore_tokens=['[PAD]', '[NOPE]']"], 4,
     ["model.loss.ce_ignore_tokens[1]", "[NOPE]"]),
    ("loss-weight-negative", ["model.loss.reg_weight=-1"], 4, ["model.loss.reg_weight"]),
    ("lm-weight-negative", ["model.loss.lm_weight=-0.5"], 4, ["model.loss.lm_weight"]),
    ("lr-positive", ["train.lr=0", "train.min_lr=0"], 4, ["train.lr"]),
    ("min-lr-le-lr", ["train.min_lr=0.01"], 4, ["train.min_lr", "train.lr"]),
    ("warmup-fraction", ["train.lr_warmup_fraction=1.5"], 4, ["train.lr_warmup_fraction"]),
    ("adam-betas", ["train.adam_beta2=1.0"], 4, ["train.adam_beta2"]),
    ("fp8-needs-te", ["train.fp8=hybrid", "model.params_dtype=bfloat16"], 4,
     ["train.fp8", "model.transformer_impl"]),
    ("fp8-needs-bf16", ["train.fp8=e4m3", "model.transformer_impl=transformer_engine"], 4,
     ["train.fp8", "model.params_dtype"]),
    ("overlap-param-gather", ["parallel.overlap_param_gather=true",
                              "parallel.use_distributed_optimizer=false"], 4,
     ["parallel.overlap_param_gather", "parallel.use_distributed_optimizer"]),
    ("positive", ["train.micro_batch_size=0"], 4, ["train.micro_batch_size", "positive"]),
    ("pair-prob", ["data.pair_image_first_prob=1.5"], 4, ["data.pair_image_first_prob"]),
    ("lookahead", ["data.packing_lookahead=0"], 4, ["data.packing_lookahead"]),
    ("bad-samples", ["data.max_consecutive_bad_samples=0"], 4, ["data.max_consecutive_bad_samples"]),
    ("blend-weight", ["data.path=['0:/a', '1:/b']"], 4, ["data.path[0]", "WEIGHT"]),
    ("positive-negative-tp", ["parallel.tensor_model_parallel_size=-2"], None,
     ["parallel.tensor_model_parallel_size", "positive"]),
]
SEVERAL = {"tp-lm-heads"}  # TP=3 also fails ViT heads, FFN, vocabulary and SP seq_length


def _case(c):
    return pytest.param(*c, id=c[0]) if type(c) is tuple else c


@pytest.mark.parametrize("name, overrides, world, expected", [_case(c) for c in RULES])
def test_validator_rule_names_its_fields(name, overrides, world, expected):
    errors = config_errors(load_config(TINY, overrides), world_size=world)
    assert any(all(part in e for part in expected) for e in errors), errors
    if name not in SEVERAL:
        assert len(errors) == 1, errors
    with pytest.raises(ConfigError) as info:
        validate(load_config(TINY, overrides), world)
    assert info.value.errors == errors


@pytest.mark.parametrize("override", ["model.lm.num_attention_heads=0", "model.vision.num_heads=0",
                                      "model.vision.patch_size=0", "model.adapter.n_query=-4"])
def test_non_positive_sizes_are_reported_not_crashing(override):
    key = override.split("=")[0]
    errors = config_errors(load_config(TINY, [override]), world_size=TINY_WORLD)
    assert any(key in e and "positive" in e for e in errors), errors
