"""Image pipelines (scm_jax/data/images.py): order, resume, host sharding, preprocessing, errors.

Most tests read TFDS's mock data (`tfds.testing.mock_data` patches `DatasetBuilder.
as_data_source`, which `tfds.data_source` calls); ImageNet mock images have random sizes, so the
crop/resize path runs. The real read path (array_record files, tf.train.Example protos, PNG
decoding, all without TensorFlow) is tested on tiny datasets written here into tmp_path with
TFDS's own metadata writer.
"""
import io
import json

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from scm_jax.data.image_preprocessing import adm_center_crop, uint8_to_unit_range
from scm_jax.data.images import build_image_batches, image_data_config, image_source

N = 10  # mock examples


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=N):
        yield


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype
            np.testing.assert_array_equal(x[key], y[key])


def record_ids(images, references):
    """Index of the reference each image is (as is or flipped left-right), and the flip bits."""
    ids, flips = [], []
    for image in images:
        hits = [(i, f) for i, ref in enumerate(references) for f in (False, True)
                if np.array_equal(image, ref[:, ::-1] if f else ref)]
        assert hits, "a batch row is none of the dataset's records"
        ids.append(hits[0][0])
        flips.append(hits[0][1])
    return np.array(ids), np.array(flips)


# --- ADM preprocessing against a closed-form reference -------------------------------------------

# (H, W), per resize of the long axis (input size, output size), crop offset on the long axis.
# Sizes worked out by hand from the ADM rule for resolution 64.
ADM_CASES = [
    ((160, 400), [(400, 200), (200, 160)], 48),    # one exact halving, then bicubic down
    ((130, 261), [(261, 130), (130, 128)], 32),    # halving an odd size, then bicubic down
    ((300, 90), [(300, 213)], 74),                 # tall: no halving (90 < 128), bicubic down
    ((40, 50), [(50, 80)], 8),                     # smaller than the target: bicubic up
]


@pytest.mark.parametrize("shape, resizes, offset", ADM_CASES)
def test_adm_center_crop_matches_gradient_reference(shape, resizes, offset):
    """Box and bicubic filters are symmetric and normalized, so away from the borders they map a
    linear ramp to the ramp sampled at the pixel centers: output j of an a -> b resize sits at
    input (j + 1/2) a / b - 1/2. Following that chain from the crop gives each output's value."""
    res, long_axis = 64, int(np.argmax(shape))
    length = shape[long_axis]
    ramp = lambda x: 30.0 + 190.0 * x / (length - 1)  # noqa: E731
    ramp_1d = np.round(ramp(np.arange(length))).astype(np.uint8)
    image = np.broadcast_to(ramp_1d[:, None] if long_axis == 0 else ramp_1d[None, :], shape)
    image = np.repeat(image[..., None], 3, axis=-1)

    out = adm_center_crop(image, res)
    assert out.shape == (res, res, 3) and out.dtype == np.uint8

    x = np.arange(res) + offset
    for size_in, size_out in reversed(resizes):
        x = (x + 0.5) * size_in / size_out - 0.5
    expected = ramp(x)
    profile = out[..., 0].astype(np.float64)
    profile = profile if long_axis == 0 else profile.T  # [long, short]
    err = profile - expected[:, None]
    # Rounding of the input, of the uint8 image after each halving (PIL rounds the .5 means of
    # pairs up: a bias of ~+0.3) and of the output.
    assert np.abs(err).max() <= 1.51
    # A crop off by one pixel would shift every value by 1.19 or more.
    assert abs(err.mean()) < 0.6
    # Constant along the short axis (no crop there; borders only add rounding).
    assert np.ptp(profile, axis=1).max() <= 1


def test_adm_center_crop_identity_grayscale_and_errors():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(adm_center_crop(image, 32), image)
    gray = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    rgb = adm_center_crop(gray, 16)
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    with pytest.raises(ValueError, match="uint8"):
        adm_center_crop(image.astype(np.float32), 16)
    with pytest.raises(ValueError, match="resolution"):
        adm_center_crop(image, 0)
    np.testing.assert_allclose(uint8_to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])


# --- Config --------------------------------------------------------------------------------------

def test_config_schema_and_bad_values():
    cfg = image_data_config("imagenet64")
    assert (cfg.tfds_name, cfg.resolution, cfg.num_classes) == ("imagenet2012", 64, 1000)
    assert cfg.sigma_d == 0.5
    assert (cfg.data_dir, cfg.split, cfg.random_flip, cfg.num_workers) == ("", "train", False, 0)
    assert image_data_config("imagenet512").resolution == 512
    assert image_data_config("cifar10", random_flip=True, data_dir="/d").data_dir == "/d"
    with pytest.raises(ValueError, match=r"'imagenet2'.*'cifar10', 'imagenet512', 'imagenet64'"):
        image_data_config("imagenet2")
    with pytest.raises(ValueError, match="unknown data config keys.*shuffle_bufer"):
        image_data_config("cifar10", shuffle_bufer=10)
    with pytest.raises(ValueError, match="data.resolution = 0"):
        image_data_config("cifar10", resolution=0)
    with pytest.raises(ValueError, match="data.num_workers = -1"):
        image_data_config("cifar10", num_workers=-1)
    for kwargs, match in [(dict(batch_size=5, process_count=2), "divisible"),
                          (dict(batch_size=4, process_index=2, process_count=2), "process_index"),
                          (dict(batch_size=4, num_epochs=0), "num_epochs"),
                          (dict(batch_size=4, seed=-1), "seed")]:
        kwargs.setdefault("seed", 0)
        with pytest.raises(ValueError, match=match):
            build_image_batches(image_data_config("cifar10"), **kwargs)


# --- Mock TFDS data ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, resolution",
                         [("cifar10", 32), ("imagenet64", 64), ("imagenet64", 8)])
def test_ordered_pass_shapes_values_and_remainder(mock_tfds, name, resolution):
    """One ordered pass equals the records, preprocessed one by one; remainder kept or dropped."""
    cfg = image_data_config(name, resolution=resolution)
    source = image_source(cfg)
    assert len(source) == N
    raw = [source[i] for i in range(N)]
    if name == "imagenet64":
        sizes = {r["image"].shape[:2] for r in raw}
        assert len(sizes) > 1 and any(h != w for h, w in sizes)
        if resolution == 8:  # the box-halving path runs too
            assert any(min(s) >= 16 for s in sizes)

    it = build_image_batches(cfg, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                             drop_remainder=False)
    batches = list(it)
    assert it.num_batches == 3 and [len(b["label"]) for b in batches] == [4, 4, 2]
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.shape == (N, resolution, resolution, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.2
    expected = np.stack([adm_center_crop(r["image"], resolution) for r in raw])
    np.testing.assert_array_equal(images, expected.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(labels, [int(r["label"]) for r in raw])

    dropped = list(build_image_batches(cfg, batch_size=4, seed=0, shuffle=False, num_epochs=1))
    assert_same_batches(dropped, batches[:2])


def test_shuffle_is_a_permutation_per_epoch_and_resume_is_exact(mock_tfds):
    cfg = image_data_config("cifar10", random_flip=True)
    source = image_source(cfg)
    references = [uint8_to_unit_range(source[i]["image"]) for i in range(N)]
    build = lambda seed: build_image_batches(cfg, batch_size=4, seed=seed)  # noqa: E731

    it = build(3)
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 4)
    resumed = build(3)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), rest)
    assert_same_batches(take(build(3), 7), first + rest)  # deterministic given the seed

    ids, flips = record_ids(np.concatenate([b["image"] for b in first + rest]), references)
    epochs = ids[:20].reshape(2, N)
    for epoch in epochs:
        assert sorted(epoch) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(N))
    assert 0 < flips.sum() < len(flips)

    other = np.concatenate([b["image"] for b in take(build(4), 2)])
    assert not np.array_equal(other, np.concatenate([b["image"] for b in first[:2]]))
    with pytest.raises(ValueError, match="seed=3 but this pipeline has seed=4"):
        build(4).set_state(state)
    with pytest.raises(ValueError, match="no .batches. entry"):
        build(3).set_state({"next_index": 1})


def test_two_hosts_split_each_global_batch(mock_tfds):
    """Host p's rows of global batch b are rows [2p, 2p + 2) of the one-host batch b."""
    cfg = image_data_config("imagenet64", resolution=8, random_flip=True)
    references = [uint8_to_unit_range(adm_center_crop(image_source(cfg)[i]["image"], 8))
                  for i in range(N)]
    one = take(build_image_batches(cfg, batch_size=4, seed=1), 5)
    hosts = [take(build_image_batches(cfg, batch_size=4, seed=1, process_index=p,
                                      process_count=2), 5) for p in range(2)]
    for b in range(5):
        joined = {k: np.concatenate([hosts[0][b][k], hosts[1][b][k]]) for k in ("image", "label")}
        assert_same_batches([joined], [one[b]])
        assert hosts[0][b]["image"].shape == (2, 8, 8, 3)
    # Within the first epoch (global batches 0, 1) the hosts read disjoint records.
    ids = [record_ids(np.concatenate([h[0]["image"], h[1]["image"]]), references)[0] for h in hosts]
    assert len(set(ids[0]) | set(ids[1])) == 8

    # Ordered pass with a partial last batch: 2 rows left, one per host.
    parts = [list(build_image_batches(cfg, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                                      drop_remainder=False, process_index=p, process_count=2))
             for p in range(2)]
    assert [[len(b["label"]) for b in part] for part in parts] == [[2, 2, 1], [2, 2, 1]]
    order = [b for triple in zip(*parts) for b in triple]
    ids = record_ids(np.concatenate([b["image"] for b in order]), references)[0]
    np.testing.assert_array_equal(ids, np.arange(N))


# --- Missing or misformatted data ----------------------------------------------------------------

def test_missing_data_says_how_to_prepare(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        image_source(image_data_config("cifar10", data_dir=root))
    msg = str(err.value)
    assert f"tfds build cifar10 --file_format=array_record --data_dir={root}" in msg
    assert "pip install -e '.[data]'" in msg and "manual" not in msg

    with pytest.raises(FileNotFoundError) as err:
        build_image_batches(image_data_config("imagenet64", data_dir=root), batch_size=4, seed=0)
    msg = str(err.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert f"{root}/downloads/manual/" in msg
    assert (f"tfds build imagenet2012 --file_format=array_record --data_dir={root} "
            f"--manual_dir={root}/downloads/manual") in msg
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created


def test_dataset_in_another_format_is_reported(tmp_path):
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))  # TFDS's default: tfrecord
    builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
        name="train", shard_lengths=[3], num_bytes=0, filename_template=None)]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with pytest.raises(FileNotFoundError,
                       match=r"(?s)\['tfrecord'\].*array_record.*tfds build cifar10"):
        image_source(image_data_config("cifar10", data_dir=str(tmp_path)))


# --- Real array_record files, read without TensorFlow --------------------------------------------

def write_array_record_dataset(data_dir, tfds_name, images, labels, split="train"):
    """A prepared TFDS dataset: TFDS's metadata plus one array_record shard of Example protos."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.proto import tf_example_pb2 as ex_pb
    from tensorflow_datasets.proto import tf_feature_pb2 as ft_pb

    builder = tfds.builder(tfds_name, data_dir=str(data_dir), file_format="array_record")
    builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
        name=split, shard_lengths=[len(images)], num_bytes=0, filename_template=None)]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    text_key = "id" if tfds_name == "cifar10" else "file_name"
    writer = ArrayRecordWriter(str(builder.info.splits[split].filepaths[0]), "group_size:1")
    for i, (image, label) in enumerate(zip(images, labels)):
        png = io.BytesIO()
        PIL.Image.fromarray(image).save(png, format="PNG")
        feature = {"image": ft_pb.Feature(bytes_list=ft_pb.BytesList(value=[png.getvalue()])),
                   "label": ft_pb.Feature(int64_list=ft_pb.Int64List(value=[int(label)])),
                   text_key: ft_pb.Feature(bytes_list=ft_pb.BytesList(value=[b"x%d" % i]))}
        writer.write(ex_pb.Example(features=ft_pb.Features(feature=feature)).SerializeToString())
    writer.close()


def test_real_array_record_cifar10_and_imagenet(tmp_path):
    rng = np.random.default_rng(0)
    cifar = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    write_array_record_dataset(tmp_path, "cifar10", cifar, np.arange(6) % 10)
    imagenet = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                for h, w in [(70, 90), (150, 64), (64, 64)]]
    write_array_record_dataset(tmp_path, "imagenet2012", imagenet, [7, 999, 0])

    cfg = image_data_config("cifar10", data_dir=str(tmp_path))
    (batch,) = list(build_image_batches(cfg, batch_size=6, seed=0, shuffle=False, num_epochs=1))
    np.testing.assert_array_equal(batch["image"], cifar.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(batch["label"], np.arange(6) % 10)

    cfg = image_data_config("imagenet64", data_dir=str(tmp_path))
    (batch,) = list(build_image_batches(cfg, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                                        drop_remainder=False))
    expected = np.stack([adm_center_crop(image, 64) for image in imagenet])
    np.testing.assert_array_equal(batch["image"], expected.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(batch["label"], [7, 999, 0])


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    write_array_record_dataset(tmp_path, "cifar10", images, np.arange(7))
    in_process = image_data_config("cifar10", data_dir=str(tmp_path), random_flip=True)
    workers = image_data_config("cifar10", data_dir=str(tmp_path), random_flip=True, num_workers=2)
    expected = take(build_image_batches(in_process, batch_size=2, seed=5), 7)
    # One iterator (each one starts its own processes, seconds apiece on a small machine).
    with build_image_batches(workers, batch_size=2, seed=5) as it:
        assert_same_batches(take(it, 3), expected[:3])
        state = json.loads(json.dumps(it.get_state()))
        assert_same_batches(take(it, 4), expected[3:])
        it.set_state(state)  # back to batch 3, in the workers too
        assert_same_batches(take(it, 4), expected[3:])
