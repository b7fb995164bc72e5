"""The app against a real PACS: Orthanc with its DICOMweb plugin, driven by MONAI Label's client.

An Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed with apt-get when
missing and possible) runs as a subprocess on 127.0.0.1 with its own configuration and
storage in a temporary folder. Synthetic volumes are turned into CT series (and one MR series
that the server's default search filter, ``Modality=CT``, leaves out) and uploaded. The
MONAI Label server then runs with ``--studies http://127.0.0.1:PORT/dicom-web`` and is used
only through ``MONAILabelClient``, as Slicer's plugin does: submitted labels must end up in
Orthanc as DICOM SEG that reproduce them; a second server with an empty cache must read them
back from the SEGs, start training on the next submit and train on the labeled plus the
unlabeled CT series; auto-segmentation must return a label on the series' grid (as MONAI
Label converts it) that matches the ground truth.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from monailabel.datastore.utils.convert import dicom_to_nifti, nifti_to_dicom_seg
from pydicom.uid import generate_uid

from cotrain.studies import write_demo_studies
from tests.app_helpers import (
    FAST_SERVER_CONF,
    NO_SCORING_ENV,
    MonaiLabelServer,
    copy_app,
    dice,
    free_port,
    use_app_lib,
    wait_for,
    wait_for_training,
)

pytestmark = pytest.mark.server

logger = logging.getLogger(__name__)

ORTHANC_PACKAGES = ("orthanc", "orthanc-dicomweb")
#: Where the Debian package puts the DICOMweb plugin (the first is a link to the second).
DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
APT_TIMEOUT_S = 900
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


# ---------------------------------------------------------------------------------- Orthanc
def _dicomweb_plugin() -> str | None:
    """The DICOMweb plugin library of the Debian package, if installed."""
    for path in DICOMWEB_PLUGINS:
        if os.path.isfile(path):
            return path
    matches = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return str(matches[0]) if matches else None


def _run_apt(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=APT_TIMEOUT_S,
        check=False,
    )


@contextlib.contextmanager
def _no_service_start() -> Iterator[None]:
    """Keep the package's post-install script from starting the system Orthanc service.

    Debian's ``invoke-rc.d`` asks ``/usr/sbin/policy-rc.d``; exit code 101 means "do not
    start". An existing policy is left as it is.
    """
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\n# written by cotrain's tests/test_dicomweb.py\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def install_orthanc() -> tuple[str, str]:
    """The ``Orthanc`` binary and its DICOMweb plugin; installed with apt-get if missing.

    Returns:
        ``(binary, plugin)`` paths.

    Raises:
        pytest.skip.Exception: Where Orthanc is missing and cannot be installed (not root, no
            apt-get, or the install failed), with the reason.
    """
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    plugin = _dicomweb_plugin()
    if binary and plugin:
        return binary, plugin
    missing = " and ".join(
        what for what, found in (("Orthanc", binary), ("its DICOMweb plugin", plugin)) if not found
    )
    if not shutil.which("apt-get"):
        pytest.skip(f"{missing} not installed and no apt-get to install {ORTHANC_PACKAGES}")
    if os.geteuid() != 0:
        pytest.skip(f"{missing} not installed; installing {ORTHANC_PACKAGES} needs root")
    start = time.monotonic()
    install = ["install", "-y", "--no-install-recommends", *ORTHANC_PACKAGES]
    try:
        with _no_service_start():
            result = _run_apt(install)
            if result.returncode != 0:
                # Stale or missing package lists (a fresh machine): update once and retry.
                _run_apt(["update"])
                result = _run_apt(install)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot install {ORTHANC_PACKAGES} with apt-get: {e}")
    if result.returncode != 0:
        tail = "\n".join(f"{result.stdout}\n{result.stderr}".strip().splitlines()[-5:])
        pytest.skip(f"apt-get install {' '.join(ORTHANC_PACKAGES)} failed:\n{tail}")
    logger.info("installed %s in %.0fs", ORTHANC_PACKAGES, time.monotonic() - start)
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    plugin = _dicomweb_plugin()
    if not binary or not plugin:
        pytest.skip(f"apt-get installed {ORTHANC_PACKAGES} but {missing} is still missing")
    return binary, plugin


class Orthanc:
    """An Orthanc subprocess with its own configuration and storage in ``folder``.

    It answers HTTP on 127.0.0.1 only (``RemoteAccessAllowed`` false), without
    authentication; its DICOMweb API is :attr:`dicomweb_url`. Orthanc 1.10 cannot bind its
    DICOM (DIMSE) server to one interface, and nothing here needs it, so it is configured
    on a free port but turned off.

    Args:
        binary: The ``Orthanc`` executable.
        plugin: The DICOMweb plugin library.
        folder: Receives the configuration, the storage and the log.
    """

    def __init__(self, binary: str, plugin: str, folder: Path) -> None:
        self.binary = binary
        self.plugin = plugin
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.log_path = folder / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        """Write the JSON configuration; return its path."""
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cotrain-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "DicomAet": "COTRAINTEST",
            "SaveJobs": False,
            "Plugins": [self.plugin],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                "Ssl": False,
                "Host": f"127.0.0.1:{self.port}",
            },
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout_s: float = 60.0) -> Orthanc:
        """Start Orthanc and wait until ``/system`` answers with the DICOMweb plugin loaded."""
        config = self.write_config()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "--logdir=" + str(self.folder), str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log()}")
            try:
                requests.get(f"{self.url}/system", timeout=2).raise_for_status()
                plugins = requests.get(f"{self.url}/plugins", timeout=2).json()
            except (requests.RequestException, ValueError):
                return False
            return "dicom-web" in plugins

        try:
            wait_for(ready, timeout_s, "Orthanc to answer /system", 0.25)
        except TimeoutError as e:
            self.stop()
            raise TimeoutError(f"{e}\n{self.log()}") from None
        return self

    def log(self, lines: int = 40) -> str:
        """The last lines of Orthanc's output and log files."""
        texts = []
        for path in [self.log_path, *sorted(self.folder.glob("Orthanc*.log*"))]:
            with contextlib.suppress(OSError):
                texts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(texts[-lines:])

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files with ``POST /instances``."""
        with requests.Session() as session:
            for path in files:
                response = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
                response.raise_for_status()

    def series(self, modality: str) -> dict[str, dict[str, Any]]:
        """The series of one modality: SeriesInstanceUID -> their first instance's main tags
        (Orthanc's ``/tools/find``)."""
        query = {"Level": "Series", "Query": {"Modality": modality}, "Expand": True}
        found = requests.post(f"{self.url}/tools/find", json=query, timeout=30)
        found.raise_for_status()
        result = {}
        for series in found.json():
            instance = series["Instances"][0]
            tags = requests.get(f"{self.url}/instances/{instance}/tags?simplify", timeout=30)
            tags.raise_for_status()
            result[series["MainDicomTags"]["SeriesInstanceUID"]] = {
                "instances": series["Instances"],
                "tags": tags.json(),
            }
        return result

    def instance_file(self, instance: str) -> bytes:
        """The DICOM file of an Orthanc instance id."""
        response = requests.get(f"{self.url}/instances/{instance}/file", timeout=30)
        response.raise_for_status()
        return response.content


# ------------------------------------------------------------------------- DICOM series
def write_dicom_series(
    nifti: Path, out_dir: Path, modality: str, patient_id: str, description: str
) -> tuple[str, list[Path]]:
    """Write a NIfTI volume as a DICOM series (one file per slice) with SimpleITK.

    CT slices hold the intensities rounded as Hounsfield units (stored with RescaleIntercept
    -1024, which SimpleITK's GDCM writer applies), MR slices the intensities rounded and shifted
    to non-negative values; both as 16-bit integers. Each slice has its own
    ImagePositionPatient and InstanceNumber, the series' ImageOrientationPatient,
    PixelSpacing and SliceThickness, and new study, series, frame of reference and instance
    UIDs.

    Returns:
        The SeriesInstanceUID and the files.
    """
    image = sitk.ReadImage(str(nifti))
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    values = np.round(values)
    if modality == "CT":
        pixels = np.clip(values, -1024, 3071)
        sop_class, rescale = CT_IMAGE_STORAGE, ("-1024", "1", "HU")
    else:
        pixels = np.clip(values - values.min(), 0, 32767)
        sop_class, rescale = MR_IMAGE_STORAGE, ("0", "1", "US")
    volume = sitk.GetImageFromArray(pixels.astype(np.int16))
    volume.CopyInformation(image)

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    direction = volume.GetDirection()
    orientation = [
        direction[0],
        direction[3],
        direction[6],
        direction[1],
        direction[4],
        direction[7],
    ]
    today = time.strftime("%Y%m%d")
    now = time.strftime("%H%M%S")
    common = {
        "0008|0016": sop_class,
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0020": today,
        "0008|0021": today,
        "0008|0030": now,
        "0008|0031": now,
        "0008|0060": modality,
        "0008|103e": description,
        "0010|0010": f"Synthetic^{patient_id}",
        "0010|0020": patient_id,
        "0018|0050": f"{volume.GetSpacing()[2]:.6g}",
        "0020|000d": study,
        "0020|000e": series,
        "0020|0010": "1",
        "0020|0011": "1",
        "0020|0052": frame,
        "0020|0037": "\\".join(f"{v:.6g}" for v in orientation),
        "0028|1052": rescale[0],
        "0028|1053": rescale[1],
        "0028|1054": rescale[2],
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(volume.GetDepth()):
        slice_k = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            **common,
            "0008|0018": generate_uid(),
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6g}" for v in position),
        }
        for key, value in tags.items():
            slice_k.SetMetaData(key, value)
        path = out_dir / f"{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_k)
        files.append(path)
    return series, files


def converted_image(series_dir: Path) -> nib.Nifti1Image:
    """The series as MONAI Label converts it (``dicom_to_nifti``), loaded."""
    path = dicom_to_nifti(str(series_dir))
    image = nib.load(path)
    image = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    os.unlink(path)
    return image


def seg_voxels(seg: bytes, reference: Path) -> tuple[np.ndarray, list[str]]:
    """A DICOM SEG's segment numbers on the grid of ``reference`` (a NIfTI image, in
    nibabel's x, y, z order), and its segment names."""
    dataset = pydicom.dcmread(io.BytesIO(seg))
    result = pydicom_seg.MultiClassReader().read(dataset)
    image = sitk.ReadImage(str(reference))
    resampled = sitk.Resample(
        result.image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16
    )
    names = [str(s.SegmentLabel) for s in dataset.SegmentSequence]
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0), names


# --------------------------------------------------------------------------------- the test
#: ``--conf`` of a server that trains in about a minute on 2 CPU cores (see
#: :data:`FAST_SERVER_CONF`), without validation; training starts at 3 labels.
DICOM_CONF = {"models": "dct_seg", **FAST_SERVER_CONF, "val_split": "0"}
NUM_CT = 6
TRAIN_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc with DICOMweb on 127.0.0.1 (installed first if needed and possible)."""
    binary, plugin = install_orthanc()
    server = Orthanc(binary, plugin, tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pacs_studies(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Synthetic CT series (and one MR series) uploaded to Orthanc, with their ground truth.

    Returns:
        ``ct``: the CT SeriesInstanceUIDs in order, ``mr``: the MR one, ``dirs``: series uid
        -> the folder of its DICOM files, ``truth``: series uid -> ground truth NIfTI.
    """
    root = tmp_path_factory.mktemp("pacs")
    studies = write_demo_studies(
        root / "nifti",
        num_images=NUM_CT + 1,
        num_labeled=0,
        shape=(32, 32, 32),
        seed=0,
        spacing=(1.0, 1.0, 1.5),
        truth_dir=root / "truth",
    )
    ct: list[str] = []
    mr = ""
    dirs: dict[str, Path] = {}
    truth: dict[str, Path] = {}
    for i, name in enumerate(studies.unlabeled):
        modality = "MR" if i == NUM_CT else "CT"
        series, files = write_dicom_series(
            studies.folder / f"{name}.nii.gz", root / "dicom" / name, modality, f"P{i:03d}", name
        )
        orthanc.upload(files)
        dirs[series] = root / "dicom" / name
        truth[series] = root / "truth" / f"{name}.nii.gz"
        if modality == "CT":
            ct.append(series)
        else:
            mr = series
    assert set(orthanc.series("CT")) == set(ct) and set(orthanc.series("MR")) == {mr}
    return {"ct": ct, "mr": mr, "dirs": dirs, "truth": truth}


def _submit(client: MONAILabelClient, series: str, label: Path) -> dict[str, Any]:
    """Submit a final label as Slicer's plugin does (with the segments' names and values)."""
    return client.save_label(
        series, str(label), params={"label_info": [{"name": "organ", "idx": 1}]}
    )


def test_dicomweb_end_to_end(
    orthanc: Orthanc, pacs_studies: dict[str, Any], tmp_path: Path
) -> None:
    ct: list[str] = pacs_studies["ct"]
    truth: dict[str, Path] = pacs_studies["truth"]
    app_dir = copy_app(tmp_path / "app")
    (tmp_path / "client").mkdir()

    def server(name: str) -> MonaiLabelServer:
        env = {**NO_SCORING_ENV, "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / f"cache_{name}")}
        log = tmp_path / f"server_{name}.log"
        return MonaiLabelServer(app_dir, orthanc.dicomweb_url, DICOM_CONF, log, env)

    def truth_voxels(series: str) -> np.ndarray:
        return np.asarray(nib.load(truth[series]).dataobj)

    with server("a") as server_a:
        client = MONAILabelClient(server_a.url, tmpdir=str(tmp_path / "client"))
        info = client.info()
        assert info["models"]["dct_seg"]["labels"] == {"organ": 1}
        assert "dct_seg" in info["trainers"]

        # The series to annotate are the CT series (default search filter Modality=CT).
        sample = client.next_sample("random", {})
        assert sample["id"] in ct, sample

        # Labels that cannot be stored are refused and store nothing.
        with pytest.raises(MONAILabelClientException, match="404"):
            _submit(client, "1.2.3.4.5", truth[ct[0]])
        empty = tmp_path / "empty.nii.gz"
        image = nib.load(truth[ct[0]])
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), empty)
        with pytest.raises(MONAILabelClientException, match="all background"):
            _submit(client, ct[0], empty)
        assert orthanc.series("SEG") == {}

        # Submitted labels become DICOM SEG in Orthanc that hold exactly the label.
        for n, series in enumerate(ct[:2], start=1):
            response = _submit(client, series, truth[series])
            assert response["train"] == {"dct_seg": f"waiting for labels ({n}/3)"}, response
        segs = orthanc.series("SEG")
        assert len(segs) == 2
        referenced = {}
        for seg in segs.values():
            tags = seg["tags"]
            assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
            referenced[tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"]] = seg
        assert set(referenced) == set(ct[:2])
        for series, seg in referenced.items():
            assert (
                seg["tags"]["StudyInstanceUID"]
                == orthanc.series("CT")[series]["tags"]["StudyInstanceUID"]
            )
            voxels, names = seg_voxels(orthanc.instance_file(seg["instances"][0]), truth[series])
            assert names == ["organ"]
            np.testing.assert_array_equal(voxels, truth_voxels(series))

    # A server with an empty cache (moved, or another server on the same PACS) reads the
    # labels back from the SEG: the third submit trains on all three; the other CT series are
    # the unlabeled set (the MR series is not one of the images).
    with server("b") as server_b:
        client = MONAILabelClient(server_b.url, tmpdir=str(tmp_path / "client"))
        response = _submit(client, ct[2], truth[ct[2]])
        assert response["train"] == {"dct_seg": "started"}, response
        assert response["labeled"] == 3
        task = wait_for_training(client, server_b, TRAIN_TIMEOUT_S)
        assert task["status"] == "DONE", f"training ended {task['status']}: {task.get('details')}"
        stats = client.info()["train_stats"]["dct_seg"]
        assert stats["labeled"] == 3 and stats["unlabeled"] == NUM_CT - 3, stats
        assert stats["skipped"] == {}, stats
        for series in ct[:3]:
            label = nib.load(client.download_label(series, "final"))
            np.testing.assert_array_equal(np.asarray(label.dataobj), truth_voxels(series))

        # Auto-segment an unlabeled series: on the series' grid, close to the ground truth.
        target = ct[-1]
        label_file, params = client.infer("dct_seg", target, {"uncertainty": True})
        expected = converted_image(pacs_studies["dirs"][target])
        label = nib.load(label_file)
        assert label.shape == expected.shape
        np.testing.assert_allclose(label.affine, expected.affine, atol=1e-4)
        np.testing.assert_allclose(expected.affine, nib.load(truth[target]).affine, atol=1e-4)
        score = dice(np.asarray(label.dataobj), truth_voxels(target))
        logger.info("Dice of the auto-segmentation: %.3f", score)
        assert score > 0.5, f"Dice {score:.3f} against ground truth (chance: about 0.1)"
        assert params["label_names"] == {"organ": 1}
        # The uncertainty map stays in the server's cache (only final labels go to the PACS).
        assert params["uncertainty"]["tag"] == "uncertainty"
        assert nib.load(client.download_label(target, "uncertainty")).shape == expected.shape
        assert len(orthanc.series("SEG")) == 3


def test_seg_segments_map_to_label_values_by_name(tmp_path: Path) -> None:
    """A SEG from another tool numbers its segments its own way: their names give the values."""
    use_app_lib()
    from lib.dicomweb import seg_to_label

    studies = write_demo_studies(
        tmp_path / "nifti", num_images=1, num_labeled=0, shape=(16, 16, 8), num_classes=3
    )
    image = studies.folder / "case_000.nii.gz"
    series_dir = tmp_path / "dicom"
    write_dicom_series(image, series_dir, "MR", "P000", "case_000")
    truth = tmp_path / "truth.nii.gz"
    voxels = np.zeros((16, 16, 8), np.uint8)
    voxels[2:6, 3:9, 1:4] = 1
    voxels[9:14, 5:12, 3:7] = 2
    nib.save(nib.Nifti1Image(voxels, nib.load(image).affine), truth)
    seg = nifti_to_dicom_seg(
        str(series_dir), str(truth), [{"name": "posterior"}, {"name": "other"}], use_itk=False
    )
    try:
        output = tmp_path / "label.nii.gz"
        seg_to_label(seg, str(image), {"anterior": 1, "posterior": 5}, str(output))
    finally:
        os.unlink(seg)
    label = nib.load(output)
    np.testing.assert_allclose(label.affine, nib.load(image).affine, atol=1e-4)
    expected = np.where(voxels == 1, 5, voxels)  # "posterior" -> 5; "other" keeps number 2
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected)
