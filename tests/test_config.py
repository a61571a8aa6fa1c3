from pathlib import Path

import pytest

from picorl.config import Config, ConfigError, describe, flatten, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_validate_and_every_knob_has_help():
    load_config(None)
    rows = describe()
    assert len(rows) > 40
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "grpo:\n  lr: 3.0e-6\n  group_size: 4\nstages:\n  - {difficulty: 2, updates: 5}\n")
    cfg = load_config(p, ["grpo.lr=1e-5", "stages.0.updates=7", "eval.difficulties=[1, 2]",
                          "model.name=Qwen/Qwen3-4B-Instruct-2507", "stages.0.promote_at=0.8"])
    assert cfg.grpo.lr == 1e-5 and cfg.grpo.group_size == 4
    assert cfg.stages[0].updates == 7 and cfg.stages[0].difficulty == 2 and cfg.stages[0].promote_at == 0.8
    assert cfg.eval.difficulties == [1, 2] and cfg.model.name == "Qwen/Qwen3-4B-Instruct-2507"


@pytest.mark.parametrize("yaml_text,overrides,msg", [
    ("grpo:\n  lrr: 1e-5\n", [], r"unknown config key 'grpo.lrr'; did you mean 'grpo.lr'"),
    ("", ["rollout.temprature=0.5"], r"'rollout.temprature'; did you mean 'rollout.temperature'"),
    ("grop: {}\n", [], r"'grop'; did you mean 'grpo'"),
    ("", ["grpo.lr=0"], r"grpo.lr=0.0 must be > 0"),
    ("", ["grpo.lr=-1e-5"], r"grpo.lr=-1e-05 must be > 0"),
    ("", ["grpo.group_size=1"], r"grpo.group_size=1 must be >= 2"),
    ("", ["model.lora.rank=0"], r"model.lora.rank=0 must be > 0"),
    ("", ["model.lora.top_layers=-1"], r"model.lora.top_layers=-1 must be >= 0 \(0 puts adapters on every layer\)"),
    ("", ["rollout.gpu_memory_utilization=1.5"], r"gpu_memory_utilization=1.5 must be in \(0, 1\]"),
    ("", ["rollout.gpu_memory_utilization=0"], r"gpu_memory_utilization=0.0 must be in \(0, 1\]"),
    ("", ["stages.0.difficulty=11"], r"stages.0.difficulty=11 must be in 1-10"),
    ("", ["eval.difficulties=[3, 12]"], r"eval.difficulties holds 12"),
    ("", ["grpo.algorithm=ppo2"], r"grpo.algorithm='ppo2' is not one of"),
    ("", ["grpo.group_size=eight"], r"grpo.group_size: expected int, got 'eight'"),
    ("", ["grpo.group_size=true"], r"grpo.group_size: expected int, got True"),
    ("stages: []\n", [], r"stages: expected a non-empty list"),
    ("stages:\n  - {difficulty: 2, updates: 5, promote: 0.8}\n", [], r"'stages\[0\].promote'; did you mean"),
    ("", ["grpo"], r"must look like key=value"),
    ("", ["sft.lr_schedule=step"], r"sft.lr_schedule='step' is not one of constant, cosine, linear"),
    ("", ["sft.warmup_steps=-1"], r"sft.warmup_steps=-1 must be >= 0"),
    ("", ["sft.steps=10", "sft.warmup_steps=10"], r"sft.warmup_steps=10 must be below sft.steps=10"),
    ("", ["rollout.hf_cache=paged"], r"rollout.hf_cache='paged' is not one of dynamic, static"),
    ("", ["rollout.hf_compile=true"], r"rollout.hf_compile=true needs rollout.hf_cache=static, got 'dynamic'"),
    ("- 1\n", [], r"expected a mapping"),
    ("", ["grpo.lr=.inf"], r"grpo.lr: expected a finite number, got inf"),
    ("", ["rollout.temperature=.nan"], r"rollout.temperature: expected a finite number, got nan"),
    ("grpo:\n  max_grad_norm: .inf\n", [], r"grpo.max_grad_norm: expected a finite number"),
    ("", ["reward.format_bonus=-.inf"], r"reward.format_bonus: expected a finite number"),
    ("", ["run.seed=1180591620717411303424"], r"run.seed=1180591620717411303424 must be in \[0, 2\*\*32\)"),
    ("", ["run.seed=-1"], r"run.seed=-1 must be in \[0, 2\*\*32\)"),
    ("", ["run.nproc_per_node=10000"], r"run.nproc_per_node=10000 is more processes than this machine's"),
    ("", ["reward.overlong_buffer=-1"], r"reward.overlong_buffer=-1 must be >= 0"),
    ("", ["eval.samples=-1"], r"eval.samples=-1 must be >= 0"),
    ("", ["eval.samples=4.5"], r"eval.samples: expected int, got 4.5"),
    ("", ["rollout.temperature=0"], r"rollout.temperature=0 samples one greedy completion k times"),
    ("", ["rollout.max_tokens=64", "reward.overlong_buffer=65"],
     r"reward.overlong_buffer=65 must be <= rollout.max_tokens=64"),
    ("", ["grpo.overlong_filter=yes please"], r"grpo.overlong_filter: expected bool"),
    ("", ["grpo.kl_reference=sft"], r"grpo.kl_reference='sft' is not one of start, base"),
    ("", ["grpo.kl_reference=base", "model.lora.enabled=false"], r"grpo.kl_reference=base is the model with its LoRA adapter off"),
    ("", ["model.lora.target_modules=[]"], r"model.lora.target_modules: expected a non-empty list, got \[\]"),
    ("", ["model.lora.target_modules=[q_proj, 3]"], r"target_modules: every item must be str, got 3"),
    ("", ["sft.difficulties=[]"], r"sft.difficulties: expected a non-empty list"),
    ("", ["eval.difficulties=[]"], r"eval.difficulties: expected a non-empty list"),
    ("", ["eval.difficulties=[true]"], r"eval.difficulties: every item must be int, got True"),
    ("", ["run.name=../escaped"], r"run.name='../escaped' must be a plain name"),
    ("", ["run.name=a/b"], r"run.name='a/b' must be a plain name"),
    ("", ["run.name.x=1"], r"run.name: expected str"),
    ("grpo:\n  lr: 1.0e-5\n", ["grpo.lr.x=1"], r"override 'grpo.lr.x': 'grpo.lr' is a value, not a section"),
    ("model:\n  lora:\n    target_modules: &a [q_proj]\nsft:\n  difficulties: *a\n", [],
     r"YAML alias \*a \(line 5\): aliases are not accepted"),
    ("", ["model.lora.target_modules=[&a q_proj, *a]"], r"YAML alias \*a"),
])
def test_bad_configs_name_key_and_value(tmp_path, yaml_text, overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(write(tmp_path, yaml_text) if yaml_text else None, overrides)


def test_an_empty_or_binary_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml is empty: a config file must set something"):
        load_config(write(tmp_path, "# nothing here\n"))
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin.yaml: not a text file"):
        load_config(p)


def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads `1e-5` as a string; `--set grpo.lr=1e-5` already meant the float.
    cfg = load_config(write(tmp_path, "grpo:\n  lr: 1e-5\nsft:\n  lr: 2E-4\n"))
    assert cfg.grpo.lr == 1e-5 and cfg.sft.lr == 2e-4
    with pytest.raises(ConfigError, match=r"grpo.lr: expected float, got '1e-5x'"):
        load_config(write(tmp_path, "grpo:\n  lr: 1e-5x\n"))


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    levels = ["a0: &a0 [q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj]"]
    levels += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 7)]
    p = write(tmp_path, "\n".join(levels) + "\n")
    # Refused at the first alias, while parsing: expanded it would be 9 x 6^6 = 420k items.
    with pytest.raises(ConfigError, match=r"YAML alias \*a0 \(line 2\)"):
        load_config(p)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_names_stage_keys():
    flat = flatten(to_dict(Config()))
    assert flat["grpo.lr"] == 1e-5 and flat["stages.0.difficulty"] == 6


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(path):
    load_config(path)


def test_docs_list_every_config_key_with_its_default():
    from cli import config_table
    page = (ROOT / "docs" / "config.md").read_text()
    assert config_table() in page, "docs/config.md's reference is stale: paste `picorl config` into it"


def test_the_readme_config_example_validates(tmp_path):
    import re
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## A config\n.*?```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "example.yaml").write_text(example)
    cfg = load_config(tmp_path / "example.yaml")
    assert cfg.stages[0].difficulty == 3 and cfg.rollout.engine == "graph"
