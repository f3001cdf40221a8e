from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from milhema.config import DEFAULTS, load_config
from milhema.errors import ConfigError


def test_defaults_file_and_overrides(tmp_path: Path) -> None:
    before = copy.deepcopy(DEFAULTS)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\ndata:\n  classes: [AML, MDS]\n")
    config = load_config(path, ["train.epochs=5", "fusion.mode=film"])
    assert config.train.lr == 0.001 and config.train.epochs == 5
    assert config.data.classes == ("AML", "MDS") and config.fusion.mode == "film"
    assert config.data.max_cells == DEFAULTS["data"]["max_cells"]
    assert DEFAULTS == before  # defaults are never mutated


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'data'"):
        load_config(None, ["dta.max_cells=3"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "'train.epochs' must be int"),
    ("train.epochs=2.5", "whole number"),
    ("train.amp=3", "true or false"),
    ("data.classes=AML", "must be a list"),
    ("data.classes=[AML]", "at least two distinct"),
    ("train.lr=0", "between 0 and 1"),
    ("cv.folds=1", "at least 2"),
    ("tracking.mode=cloud", "offline, online or disabled"),
    ("data.log_features=[ferritin]", "'ferritin', which data.patient_features does not list"),
    ("data.patient_features=[wbc, wbc]", "lists a column twice"),
    ("train", "expected key=value"),
    ("train.epochs=", "'train.epochs' cannot be empty"),
    ("train.patience=0", "train.patience must be at least 1"),
    ("cv.repeats=0", "cv.repeats must be at least 1"),
    ("train.grad_clip=0", "train.grad_clip must be greater than 0"),
    ("train.seed=-1", "train.seed must be at least 0"),
    ("train.device=tpu", "train.device must be auto, cpu"),
    ("train.lr=.inf", "must be a finite number"),
    ("data.views=PB", "data.views must be a list"),
    ("data.classes=[1, 2]", "data.classes must be a list of non-empty names"),
    ("data.classes=[AML, a/b]", "cannot be used in file names"),
    ("model.name=abmill", "did you mean 'abmil'"),
    ("train..lr=1", "has an empty part"),
])
def test_invalid_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_model_parameters_are_checked_against_the_chosen_model_when_loaded() -> None:
    assert load_config(None, ["model.name=transmil", "model.n_heads=4"]).model.params["n_heads"] == 4
    with pytest.raises(ConfigError, match=r"model 'abmil' has no parameter 'n_heads'; valid parameters: attn_dim"):
        load_config(None, ["model.n_heads=4"])  # abmil has no heads: refused before any bag is read
    with pytest.raises(ConfigError, match=r"model 'graph' has no parameter 'kk' \(did you mean 'k'\?\)"):
        load_config(None, ["model.name=graph", "model.kk=4"])
    with pytest.raises(ConfigError, match=r"model 'graph': k must be a positive int, got 0"):
        load_config(None, ["model.name=graph", "model.k=0"])  # a value the constructor refuses
    with pytest.raises(ConfigError, match=r"model 'transmil': parameter 'n_heads' must be int"):
        load_config(None, ["model.name=transmil", "model.n_heads=wide"])


def test_bad_yaml_and_unsafe_tags_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_numbers_in_e_notation_and_duplicate_keys(tmp_path: Path) -> None:
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 reads 1e-3 as text
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 5\n  epochs: 50\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice \(line 4\)"):
        load_config(path)
    path.write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_cells_section_is_typed_and_validated() -> None:

    types = [t for t in DEFAULTS["cells"]["types"] if t != "band"]
    s = load_config(None, [f"cells.types=[{', '.join(types)}]", "cells.merge={band: neutrophil}",
                           "cells.merge.Stab=neutrophil", "cells.head=linear"])
    assert s.cells.merge == {"band": "neutrophil", "Stab": "neutrophil"} and s.cells.head == "linear"
    assert s.cells.type_of("band") == "neutrophil" and s.cells.type_of("neutrophil") == "neutrophil"
    assert s.cells.type_of("Band") is None   # unknown names are never guessed
    assert "band" not in s.cells.neutrophils and "neutrophil" in s.cells.neutrophils
    assert s.to_dict()["cells"]["merge"] == {"band": "neutrophil", "Stab": "neutrophil"}
    for override, message in [("cells.merge={band: neutrophil}", "remove it from cells.types to merge it"),
                              ("cells.merge={Blast: blasts}", "maps to 'blasts', which cells.types does not list"),
                              ("cells.merge=[band]", "must be a mapping of names"),
                              ("cells.head=mpl", "did you mean 'mlp'"),
                              ("cells.attribute_loss=bce", "asymmetric or focal"),
                              ("cells.neutrophil_types=[neutro]", "cells.types does not list"),
                              ("cells.folds=1", "cells.folds must be at least 2"),
                              ("cells.val_fraction=0.7", "cells.val_fraction in"),
                              ("cells.typse=[a, b]", "did you mean 'cells.types'")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
