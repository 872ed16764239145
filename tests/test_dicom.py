"""The DICOM layer (ranzcr_tf.prep.dicom) and the synthetic RSNA ICH generator (ranzcr_tf.synth.ich), on real
pydicom files written into tmp_path."""

import os

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pydicom", reason="the dicom extra is not installed (pip install 'ranzcr-tf[dicom]')")

from ranzcr_tf.prep.dicom import (  # noqa: E402
    WINDOWS,
    DicomError,
    apply_windows,
    neighbour_ids,
    parse_windows,
    read_hu,
    resize_nearest,
    scan_folder,
    slice_channels,
)
from ranzcr_tf.synth.ich import ICH_LABELS, ct_slice, dicom_bytes, main, make_dataset  # noqa: E402


def write(folder, name, stored, **fields):
    """One CT slice file ``folder/name.dcm`` holding ``stored`` exactly; header fields as ``ct_slice`` takes them."""
    fields.setdefault("sop", name)
    fields.setdefault("patient", "ID_p0")
    fields.setdefault("study", "ID_st0")
    fields.setdefault("series", "ID_se0")
    fields.setdefault("z", 0.0)
    ds = ct_slice(np.asarray(stored), **fields)
    path = os.path.join(folder, f"{name}.dcm")
    with open(path, "wb") as fh:
        fh.write(dicom_bytes(ds))
    return path, ds


# ----------------------------------------------------------------------------------------------
# HU and windows.

def test_hu_and_windows_equal_hand_computation(tmp_path):
    path, _ = write(tmp_path, "ID_a", [[0, 1024], [1064, 2048]], slope=1.0, intercept=-1024.0, signed=True,
                    patient="ID_pat", study="ID_study", series="ID_series", z=-37.5)
    hu, meta = read_hu(path)
    assert hu.dtype == np.float32 and hu.shape == (2, 2)
    np.testing.assert_array_equal(hu, [[-1024, 0], [40, 1024]])
    assert (meta.sop_uid, meta.patient_id, meta.study_uid, meta.series_uid, meta.z) == (
        "ID_a", "ID_pat", "ID_study", "ID_series", -37.5)

    windows = parse_windows(["brain", "subdural", "bone"])
    assert windows == [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)]
    out = apply_windows(hu, windows)
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    # brain: 0 at 0 HU, 1 at 80 HU; subdural: 0 at -20, 1 at 180; bone: 0 at -800, 1 at 2000.
    np.testing.assert_allclose(out[..., 0], [[0, 0], [0.5, 1]], atol=1e-6)
    np.testing.assert_allclose(out[..., 1], [[0, 0.1], [0.3, 1]], atol=1e-6)
    np.testing.assert_allclose(out[..., 2], [[0, 800 / 2800], [840 / 2800, 1824 / 2800]], atol=1e-6)

    # A non-trivial slope on unsigned pixels: HU = 2 * stored - 2048.
    path, _ = write(tmp_path, "ID_b", [[0, 1024], [1044, 1100]], slope=2.0, intercept=-2048.0, signed=False)
    hu, _ = read_hu(path)
    np.testing.assert_array_equal(hu, [[-2048, 0], [40, 152]])
    np.testing.assert_allclose(apply_windows(hu, [(100.0, 100.0)])[..., 0], [[0, 0], [0, 1]], atol=1e-6)
    np.testing.assert_allclose(apply_windows(hu, [(40.0, 80.0)])[..., 0], [[0, 0], [0.5, 1]], atol=1e-6)


def test_parse_windows_names_pairs_and_bad_entries():
    assert parse_windows(["brain", [35, 70], (600, 2800.0)]) == [(40.0, 80.0), (35.0, 70.0), (600.0, 2800.0)]
    assert parse_windows(["Bone"]) == [WINDOWS["bone"]]
    with pytest.raises(ValueError, match=r"windows\[1\]='lung'.*brain, subdural, bone"):
        parse_windows(["brain", "lung"])
    with pytest.raises(ValueError, match=r"windows\[0\]=\[40, 0\].*positive"):
        parse_windows([[40, 0]])
    with pytest.raises(ValueError, match=r"windows\[0\]=\[1, 2, 3\]"):
        parse_windows([[1, 2, 3]])
    with pytest.raises(ValueError, match="non-empty list"):
        parse_windows("brain")
    with pytest.raises(ValueError, match="non-empty list"):
        parse_windows([])


def test_rsna_12bit_intercept_quirk_is_fixed(tmp_path):
    hu_true = np.array([[-1000, 0], [40, 1500]])
    # As the quirky competition files hold them: 12 bits stored, unsigned, intercept 0, HU wrapped modulo 4096.
    stored = np.mod(hu_true, 4096)
    assert stored.tolist() == [[3096, 0], [40, 1500]]
    path, _ = write(tmp_path, "ID_q", stored, bits_stored=12, signed=False, intercept=0.0)
    hu, _ = read_hu(path)
    # (stored + 1000) with 4096 subtracted at or above 4096, then intercept -1000.
    np.testing.assert_array_equal(hu, [[(3096 + 1000 - 4096) - 1000, 1000 - 1000], [1040 - 1000, 2500 - 1000]])
    np.testing.assert_array_equal(hu, hu_true)
    # The ordinary 12-bit file (intercept -1024) is left alone, and so is an intercept at or below -100.
    path, _ = write(tmp_path, "ID_ok", [[24, 1024]], bits_stored=12, signed=False, intercept=-1024.0)
    np.testing.assert_array_equal(read_hu(path)[0], [[-1000, 0]])
    path, _ = write(tmp_path, "ID_ok2", [[24, 1024]], bits_stored=12, signed=False, intercept=-100.0)
    np.testing.assert_array_equal(read_hu(path)[0], [[-76, 924]])
    # A 16-bit file with intercept 0 is not the quirk either.
    path, _ = write(tmp_path, "ID_ok3", [[24, 1024]], bits_stored=16, signed=False, intercept=0.0)
    np.testing.assert_array_equal(read_hu(path)[0], [[24, 1024]])


def test_monochrome1_keeps_its_hu_and_only_a_file_without_rescale_is_inverted(tmp_path):
    # A CT (modality rescale present): HU = stored * slope + intercept whatever the photometric
    # interpretation, so MONOCHROME1 and MONOCHROME2 files with the same stored values read the same.
    stored = [[0, 1024], [1064, 2024]]
    for signed, bits in ((False, 12), (True, 16)):
        mono1, _ = write(tmp_path, f"ID_m1_{bits}", stored, bits_stored=bits, signed=signed, intercept=-1024.0,
                         photometric="MONOCHROME1")
        mono2, _ = write(tmp_path, f"ID_m2_{bits}", stored, bits_stored=bits, signed=signed, intercept=-1024.0)
        np.testing.assert_array_equal(read_hu(mono1)[0], [[-1024, 0], [40, 1000]])
        np.testing.assert_array_equal(read_hu(mono1)[0], read_hu(mono2)[0])
    # Raw values (no rescale, as a radiograph): inverted onto MONOCHROME2's sense, lo + hi - stored.
    path, _ = write(tmp_path, "ID_raw_u", [[4095, 3071], [3031, 2071]], bits_stored=12, signed=False, slope=None,
                    intercept=None, photometric="MONOCHROME1")
    hu, _ = read_hu(path)
    np.testing.assert_array_equal(hu, [[0, 1024], [1064, 2024]])
    assert hu[1, 1] > hu[1, 0] > hu[0, 1] > hu[0, 0]  # denser (lower stored MONOCHROME1 value) is brighter
    path, _ = write(tmp_path, "ID_raw_s", [[-1, -1025]], bits_stored=16, signed=True, slope=None, intercept=None,
                    photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_hu(path)[0], [[0, 1024]])


def test_rle_compressed_file_reads_as_the_uncompressed_one(tmp_path):
    from pydicom.pixels import get_encoder
    from pydicom.uid import RLELossless

    if not get_encoder(RLELossless).is_available:
        pytest.skip("pydicom's RLE Lossless encoder is not available in this pydicom")
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 3000, size=(24, 20))
    plain, ds = write(tmp_path, "ID_plain", stored, signed=True, intercept=-1024.0)
    ds.compress(RLELossless, generate_instance_uid=False)
    rle = os.path.join(tmp_path, "ID_rle.dcm")
    with open(rle, "wb") as fh:
        fh.write(dicom_bytes(ds))
    import pydicom

    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    assert os.path.getsize(rle) != os.path.getsize(plain)
    np.testing.assert_array_equal(read_hu(rle)[0], read_hu(plain)[0])
    np.testing.assert_array_equal(read_hu(rle)[0], stored - 1024)
    table, skipped = scan_folder(str(tmp_path))  # an encapsulated file passes the header-only check
    assert skipped == [] and sorted(table["id"]) == ["ID_plain", "ID_rle"]


# ----------------------------------------------------------------------------------------------
# Damaged files.

def test_damaged_files_raise_naming_the_file_and_the_scan_skips_them(tmp_path):
    good = [write(tmp_path, f"ID_g{i}", np.full((8, 8), 1024 + i), z=float(i))[0] for i in range(3)]
    full = open(good[0], "rb").read()
    truncated = os.path.join(tmp_path, "ID_cut.dcm")
    with open(truncated, "wb") as fh:
        fh.write(full[:-40])  # the pixel data cut short
    _, ds = write(tmp_path, "ID_nopix", np.zeros((8, 8)))
    del ds.PixelData
    nopix = os.path.join(tmp_path, "ID_nopix.dcm")
    with open(nopix, "wb") as fh:
        fh.write(dicom_bytes(ds))
    garbage = os.path.join(tmp_path, "ID_junk.dcm")
    with open(garbage, "wb") as fh:
        fh.write(b"this is not a DICOM file\n" * 10)
    header_only = os.path.join(tmp_path, "ID_head.dcm")
    with open(header_only, "wb") as fh:
        fh.write(full[:200])  # cut inside the header
    _, ds = write(tmp_path, "ID_frames", np.zeros((8, 8)))
    ds.NumberOfFrames = 2
    ds.Rows = 4
    frames = os.path.join(tmp_path, "ID_frames.dcm")
    with open(frames, "wb") as fh:
        fh.write(dicom_bytes(ds))

    for path, what in ((truncated, "cannot be decoded"), (nopix, "no pixel data"), (garbage, "not a readable DICOM"),
                       (header_only, "no pixel data"), (frames, "expected one 2-D")):
        with pytest.raises(DicomError) as info:
            read_hu(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and what in message and "\n" not in message
        assert isinstance(info.value, ValueError) and info.value.path == path
    with pytest.raises(DicomError, match="no such file"):
        read_hu(os.path.join(tmp_path, "ID_missing.dcm"))

    table, skipped = scan_folder(str(tmp_path), workers=2)
    reasons = dict(skipped)
    assert sorted(reasons) == sorted([truncated, nopix, garbage, header_only])
    assert reasons[truncated].startswith("truncated: Pixel Data says 128 bytes, the file holds 88")
    assert reasons[nopix].startswith("no pixel data") and reasons[header_only].startswith("no pixel data")
    assert reasons[garbage].startswith("not a readable DICOM file")
    assert all("\n" not in r for r in reasons.values())
    # The multi-frame file has whole pixel data, so the header scan keeps it; read_hu names it later.
    assert sorted(table["id"]) == ["ID_frames", "ID_g0", "ID_g1", "ID_g2"]
    assert table.loc[table["id"] == "ID_g1", "path"].item() == good[1]
    with pytest.raises(ValueError, match="not a folder"):
        scan_folder(os.path.join(tmp_path, "nowhere"))


# ----------------------------------------------------------------------------------------------
# Neighbours.

def _indexed_series(folder, n, series, z0, rng, shape=(16, 16)):
    """A series whose slice index is in its pixels (HU = 100 * index), written in random order with random names."""
    names = {}
    for index in rng.permutation(n):
        name = f"ID_{rng.integers(0, 16**9):09x}"
        write(folder, name, np.full(shape, 100 * index + 1024), signed=True, intercept=-1024.0, series=series,
              z=z0 + 5.0 * index, patient=f"ID_{series}", study=f"ID_{series}")
        names[int(index)] = name
    return names


def test_adjacent_slices_come_from_the_right_neighbours(tmp_path):
    rng = np.random.default_rng(7)
    first = _indexed_series(tmp_path, 7, "A", z0=-20.0, rng=rng)
    second = _indexed_series(tmp_path, 4, "B", z0=-17.5, rng=rng)  # interleaved z, another series
    table, skipped = scan_folder(str(tmp_path))
    assert skipped == [] and len(table) == 11
    assert list(table.columns) == ["id", "path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "z",
                                   "position", "prev_id", "next_id"]
    by_id = table.set_index("id")
    for names in (first, second):
        for index, name in names.items():
            assert by_id.loc[name, "position"] == index
            assert by_id.loc[name, "prev_id"] == names[max(0, index - 1)]
            assert by_id.loc[name, "next_id"] == names[min(len(names) - 1, index + 1)]
    paths = dict(zip(table["id"], table["path"]))
    # Window (500, 1000): 0 at 0 HU, 1 at 1000 HU, so a channel reads index / 10.
    for names in (first, second):
        last = len(names) - 1
        for index, name in names.items():
            ids = neighbour_ids(table, name, 1)
            assert ids[1] == name
            channels = slice_channels(paths, ids, [(500.0, 1000.0)])
            assert channels.shape == (16, 16, 3) and channels.dtype == np.float32
            expected = [max(0, index - 1), index, min(last, index + 1)]
            np.testing.assert_allclose(channels[0, 0], np.array(expected) / 10, atol=1e-6)
    ids = neighbour_ids(table, first[0], 2)
    assert ids == [first[0], first[0], first[0], first[1], first[2]]
    assert neighbour_ids(table, first[6], 2) == [first[4], first[5], first[6], first[6], first[6]]
    assert neighbour_ids(table, first[3], 0) == [first[3]]
    # Slice-major channel order with two windows: (brain, index) for each slice.
    channels = slice_channels(paths, neighbour_ids(table, first[3], 1), ["brain", (500, 1000)])
    np.testing.assert_allclose(channels[0, 0], [1, 0.2, 1, 0.3, 1, 0.4], atol=1e-6)
    with pytest.raises(ValueError, match="ID_nope: not in the scanned table"):
        neighbour_ids(table, "ID_nope", 1)
    with pytest.raises(ValueError, match="no path for slice id 'ID_x'"):
        slice_channels(paths, ["ID_x"], ["brain"])


def test_neighbour_of_another_shape_is_resized_to_the_centre(tmp_path):
    write(tmp_path, "ID_s0", np.full((16, 16), 1024 + 100), z=0.0)
    write(tmp_path, "ID_s1", np.full((24, 20), 1024 + 200), z=5.0)
    table, _ = scan_folder(str(tmp_path))
    paths = dict(zip(table["id"], table["path"]))
    channels = slice_channels(paths, neighbour_ids(table, "ID_s1", 1), [(500.0, 1000.0)])
    assert channels.shape == (24, 20, 3)
    np.testing.assert_allclose(channels[..., 0], 0.1, atol=1e-6)
    np.testing.assert_allclose(channels[..., 1:], 0.2, atol=1e-6)
    # The NumPy fallback (used without OpenCV): nearest neighbour, both ways.
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(resize_nearest(image, (6, 2)), [[0, 2], [0, 2], [4, 6], [4, 6], [8, 10], [8, 10]])
    np.testing.assert_array_equal(resize_nearest(image, (3, 4)), image)


# ----------------------------------------------------------------------------------------------
# The generator.

def _wide(csv_path):
    frame = pd.read_csv(csv_path)
    parts = frame["ID"].str.rsplit("_", n=1)
    frame["image"], frame["label"] = parts.str[0], parts.str[1]
    return frame


def test_generator_layout_labels_quirks_and_slices(tmp_path):
    out = str(tmp_path / "ich")
    summary = make_dataset(out, n_patients=8, seed=3, size=64)
    assert sorted(os.listdir(out)) == ["quirks.csv", "stage_2_sample_submission.csv", "stage_2_test", "stage_2_train",
                                       "stage_2_train.csv", "test_labels.csv"]
    train_files = sorted(n[:-4] for n in os.listdir(os.path.join(out, "stage_2_train")))
    test_files = sorted(n[:-4] for n in os.listdir(os.path.join(out, "stage_2_test")))
    assert len(train_files) == summary["n_train"] and len(test_files) == summary["n_test"] > 0
    assert all(n.startswith("ID_") and len(n) == 12 for n in train_files + test_files)

    rows = _wide(os.path.join(out, "stage_2_train.csv"))
    assert list(pd.read_csv(os.path.join(out, "stage_2_train.csv")).columns) == ["ID", "Label"]
    assert len(rows) == 6 * len(train_files) and rows["ID"].is_unique
    assert sorted(rows["image"].unique()) == train_files
    for _, group in rows.groupby("image", sort=False):
        assert list(group["label"]) == list(ICH_LABELS)
    wide = rows.pivot(index="image", columns="label", values="Label")[list(ICH_LABELS)]
    assert set(np.unique(wide.to_numpy())) <= {0, 1}
    np.testing.assert_array_equal(wide["any"], wide[list(ICH_LABELS[:5])].max(axis=1))
    assert 0.15 < wide["any"].mean() < 0.6

    sample = _wide(os.path.join(out, "stage_2_sample_submission.csv"))
    assert len(sample) == 6 * len(test_files) and sample["ID"].is_unique and (sample["Label"] == 0.5).all()
    assert sorted(sample["image"].unique()) == test_files
    truth = _wide(os.path.join(out, "test_labels.csv"))
    assert set(truth["ID"]) == set(sample["ID"])

    quirks = pd.read_csv(os.path.join(out, "quirks.csv"))
    assert list(quirks.columns) == ["id", "split", "quirk"]
    assert set(quirks["quirk"]) == {"intercept_12bit", "monochrome1", "truncated", "no_pixel_data"}
    damaged = set(quirks.loc[quirks["quirk"].isin(["truncated", "no_pixel_data"]), "id"])
    assert len(damaged) == 2 and damaged <= set(wide.index)  # their label rows exist, as in the real data

    table, skipped = scan_folder(os.path.join(out, "stage_2_train"))
    assert {os.path.basename(p)[:-4] for p, _ in skipped} == damaged
    test_table, test_skipped = scan_folder(os.path.join(out, "stage_2_test"))
    assert test_skipped == [] and len(test_table) == len(test_files)
    both = pd.concat([table, test_table])
    for _, group in both.groupby("SeriesInstanceUID"):
        assert group["PatientID"].nunique() == 1 and group["StudyInstanceUID"].nunique() == 1
        assert 8 - 2 <= len(group) <= 16  # 8-16 slices, less the (at most 2) damaged files
    # One series per patient, slices 5 mm apart (a damaged file leaves a 10 mm gap), and the file names
    # (random SOP UIDs) do not follow z.
    assert both.groupby("PatientID")["SeriesInstanceUID"].nunique().max() == 1
    name_order_is_z_order = []
    for _, group in both.groupby("SeriesInstanceUID"):
        steps = np.diff(group.sort_values("position")["z"].to_numpy())
        assert set(np.round(steps, 3)) <= {5.0, 10.0}
        name_order_is_z_order.append(list(group.sort_values("id")["id"]) == list(group.sort_values("z")["id"]))
    assert not any(name_order_is_z_order)

    # Bleeds span at least 2 consecutive slices: every run of a label along z is 2 or more long.
    labelled = table.join(wide, on="id")
    for _, group in labelled.groupby("SeriesInstanceUID"):
        for label in ICH_LABELS:
            flags = group.sort_values("position")[label].to_numpy()
            runs = np.diff(np.flatnonzero(np.diff(np.r_[0, flags, 0])))[::2]
            assert (runs >= 2).all(), (label, flags)
    assert wide[list(ICH_LABELS[:5])].sum().min() > 0  # every type appears in train

    # Quirky files read back as a head: air at -1000 in the corner, brain in [0, 80] HU at the centre.
    for quirk in ("intercept_12bit", "monochrome1"):
        name = quirks.loc[quirks["quirk"] == quirk, "id"].iloc[0]
        split = quirks.loc[quirks["id"] == name, "split"].iloc[0]
        hu, meta = read_hu(os.path.join(out, f"stage_2_{split}", f"{name}.dcm"))
        assert hu.shape == (64, 64) and meta.sop_uid == name
        assert hu[:3, :3].max() <= -990
        assert 0 <= np.median(hu[28:36, 28:36]) <= 80


def test_generator_is_seeded_and_its_cli_refuses_a_used_folder(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["--out-dir", a, "--patients", "3", "--seed", "5", "--size", "48"]) == 0
    assert "train positives" in capsys.readouterr().out
    make_dataset(b, n_patients=3, seed=5, size=48)
    for name in ("stage_2_train.csv", "stage_2_sample_submission.csv", "quirks.csv"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read()
    assert sorted(os.listdir(os.path.join(a, "stage_2_train"))) == sorted(os.listdir(os.path.join(b, "stage_2_train")))
    assert main(["--out", a, "--patients", "3", "--seed", "6"]) == 2  # --out: the older spelling of --out-dir
    assert "already holds DICOM files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="size=8"):
        make_dataset(str(tmp_path / "c"), n_patients=2, size=8)
