"""--dataset_config: kohya-ss/sd-scripts' dataset.toml, read as their config_README describes it (fallback
order subset → dataset → [general] → flags; the file wins over the flags), folders written here with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sat_train import train
from sat_train.cli import main, parse_config
from sat_train.config.settings import TrainConfig
from sat_train.data.dataset import CaptionAugment, build_dataset
from sat_train.data.masks import ALPHA, subset_mask_sources
from sat_train.data.records import collect_records
from sat_train.data.regularization import read_reg_images, with_regularization
from sat_train.demo import build_components, build_tokenizer, save_components
from sat_train.models.family import SD15
from sat_train.outputs.lora_files import KOHYA_WEIGHTS_NAME
from train_helpers import assert_same_tensors, tiny_config


def write_images(folder, stems, caption=None, seed=0, mode="RGB", suffix=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem in stems:
        pixels = rng.integers(0, 256, (64, 64, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(folder / f"{stem}.png")
        if caption is not None:
            (folder / f"{stem}{suffix}").write_text(caption)
    return folder


def toml_file(tmp_path, text: str):
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(save_components(build_components(), tmp_path_factory.mktemp("model") / "tiny-sd"))


def readme_example(tmp_path) -> str:
    """sd-scripts' docs/config_README-en.md example (its DreamBooth dataset), folders under tmp_path."""
    hoge = write_images(tmp_path / "hoge", ["h1", "h2"])
    fuga = write_images(tmp_path / "fuga", ["f1"], caption="fuga boy, smiling, outdoors", suffix=".txt")
    reg = write_images(tmp_path / "reg", ["r1", "r2", "r3"])
    return toml_file(tmp_path, f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1
""")


def test_values_fall_back_as_kohyas_readme_says_and_the_file_wins_over_flags(tmp_path, capsys):
    path = readme_example(tmp_path)
    config = parse_config(["--dataset_config", path, "--pretrained_model_name_or_path", "unused",
                           "--resolution", "768", "--train_batch_size", "1", "--train_data_dir", str(tmp_path)])
    assert (config.resolution, config.train_batch_size, config.train_data_dir) == (512, 4, None)
    assert "ignoring --train_data_dir, as sd-scripts does" in capsys.readouterr().out
    hoge, fuga, reg = config.dataset_subsets
    # "This subset uses keep_tokens = 2 (the value of the parent datasets)"; the others set their own
    assert (hoge.keep_tokens, fuga.keep_tokens, reg.keep_tokens) == (2, 3, 1)
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in (hoge, fuga, reg))
    assert (hoge.is_reg, fuga.is_reg, reg.is_reg) == (False, False, True)
    assert (hoge.class_tokens, reg.num_repeats) == ("hoge girl", 1)


def test_subsets_give_records_captions_and_caption_flags(tmp_path):
    path = readme_example(tmp_path)
    config = TrainConfig(dataset_config=path, pretrained_model_name_or_path="unused", seed=3)
    records = collect_records(config, quiet=True)
    # hoge has no caption files: kohya captions its images with the class tokens; fuga's file wins over its tokens
    assert [caption for _, caption in records.records] == ["hoge girl", "hoge girl", "fuga boy, smiling, outdoors"]
    reg = read_reg_images(config, quiet=True)
    assert [caption for _, caption in reg.records] == ["human"] * 3
    records, is_reg = with_regularization(records, reg)
    assert is_reg == [False] * 3 + [True] * 3  # kohya's balance: 3 regularization samples for 3 training ones
    dataset = build_dataset(config, records.records, records.names, [build_tokenizer()], SD15(), seed=3,
                            subsets=records.subsets)
    expected = [CaptionAugment(shuffle=True, keep_tokens=k) for k in (2, 2, 3, 1, 1, 1)]
    assert dataset.record_augments == expected
    for epoch in range(4):  # fuga's caption: its 3 tags shuffled, none kept in front (keep_tokens 3 = all kept)
        dataset.set_epoch(epoch)
        assert dataset.caption(2) == "fuga boy, smiling, outdoors"


def test_a_subset_trains_as_the_same_kohya_folder_does_bit_for_bit(tmp_path, tiny_sd):
    from safetensors.torch import load_file

    folder = write_images(tmp_path / "data" / "3_sks woman", ["a", "b"], caption="sks woman, face", seed=1)
    path = toml_file(tmp_path, f"""
[general]
caption_extension = '.txt'
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{folder}'
  num_repeats = 3
""")
    common = dict(pretrained_model_name_or_path=tiny_sd, guide="sac", max_train_steps=3, random_flip=False)
    flags = train(tiny_config(tmp_path / "flags", train_data_dir=str(tmp_path / "data"), caption_extension=".txt",
                              **common))
    toml = train(tiny_config(tmp_path / "toml", dataset_config=path, resolution=256, train_batch_size=1, **common))
    expected, got = load_file(flags), load_file(toml)
    assert_same_tensors(got, expected)


def test_regularization_and_alpha_mask_subsets_train_and_export(tmp_path, tiny_sd):
    from safetensors import safe_open

    faces = write_images(tmp_path / "faces", ["a", "b"], caption="sks woman", mode="RGBA", seed=2)
    plain = write_images(tmp_path / "plain", ["c"], caption="sks woman, outdoors", seed=3)
    reg = write_images(tmp_path / "reg", ["r1"], seed=4)
    path = toml_file(tmp_path, f"""
[general]
caption_extension = '.txt'
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{faces}'
  alpha_mask = true
  [[datasets.subsets]]
  image_dir = '{plain}'
  [[datasets.subsets]]
  image_dir = '{reg}'
  is_reg = true
  class_tokens = 'woman'
  num_repeats = 2
""")
    config = tiny_config(tmp_path / "out", pretrained_model_name_or_path=tiny_sd, dataset_config=path, guide="sac",
                         export_format="both")
    assert config.masked_loss  # a subset's alpha_mask turns the masked loss on, as in kohya
    records = collect_records(config, quiet=True)
    assert subset_mask_sources(config, records, None) == [ALPHA, ALPHA, None]  # plain: trained unmasked
    out = train(config)
    with safe_open(str(out.parent / KOHYA_WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_num_reg_images"] == "2" and metadata["ss_masked_loss"] == "True"


@pytest.mark.parametrize("text, fragment", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\ncolor_aug = true\n",
     "sets color_aug, an sd-scripts key sat does not support"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\nnum_repeat = 2\n",
     "unknown key 'num_repeat' (did you mean 'num_repeats'?)"),
    ("[general]\nimage_dir = '{d}'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
     "[general] sets image_dir, which belongs in [[datasets.subsets]]"),
    ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{d}'\n"
     "[[datasets]]\nresolution = 768\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
     "resolution is 768 in [[datasets]] 2 but 512 in [[datasets]] 1"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\nflip_aug = true\n"
     "[[datasets.subsets]]\nimage_dir = '{d}/../other'\n", None),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "[[datasets.subsets]] 1 has no image_dir"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\nnum_repeats = '10'\n",
     "num_repeats must be an integer, got '10'"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}/missing'\n", "is not a folder"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\nmetadata_file = 'md.json'\n",
     "sets metadata_file, an sd-scripts key sat does not support"),
    ("[[datasets]\n", "not valid TOML"),
    ("[general]\nshuffle_caption = true\n", "no [[datasets]]"),
])
def test_bad_dataset_configs_stop_in_one_line(tmp_path, capsys, text, fragment):
    folder = write_images(tmp_path / "img", ["a"], caption="x")
    write_images(tmp_path / "other", ["b"], caption="y")
    path = toml_file(tmp_path, text.format(d=folder))
    with pytest.raises(SystemExit) as stop:
        main(["--dataset_config", path, "--pretrained_model_name_or_path", "unused",
              "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert path in err
    if fragment is None:  # flip_aug in one subset only: sat would flip the other too
        fragment = "flip_aug is True in [[datasets]] 1, [[datasets.subsets]] 1 but not set in [[datasets]] 1, " \
                   "[[datasets.subsets]] 2"
    assert fragment in err, err


def test_a_missing_dataset_config_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--dataset_config", str(tmp_path / "nope.toml"), "--pretrained_model_name_or_path", "unused"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "cannot read it" in err and "nope.toml" in err


def test_the_readme_example_reads_as_it_says(tmp_path, monkeypatch):
    from train_helpers import REPO

    text = (REPO / "README.md").read_text()
    start = text.index("`--dataset_config dataset.toml` instead of")
    block = text[text.index("\n\n", start) + 2: text.index("\n\n", text.index("\n\n", start) + 2)]
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "train_data" / "10_sks woman", ["a"], caption="sks woman, smiling")
    write_images(tmp_path / "masks" / "10_sks woman", ["a"])
    write_images(tmp_path / "reg_data" / "1_woman", ["r"])
    (tmp_path / "dataset.toml").write_text("\n".join(line[4:] for line in block.splitlines()))
    config = TrainConfig(dataset_config="dataset.toml", pretrained_model_name_or_path="unused")
    assert (config.resolution, config.train_batch_size, config.masked_loss) == (512, 4, True)
    train_subset, reg_subset = config.dataset_subsets
    assert (train_subset.num_repeats, train_subset.keep_tokens, reg_subset.is_reg) == (10, 1, True)
    assert [c for _, c in collect_records(config, quiet=True).records] == ["sks woman, smiling"] * 10
