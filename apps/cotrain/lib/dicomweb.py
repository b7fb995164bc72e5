"""MONAI Label's DICOMweb datastore (a PACS such as Orthanc), made to work with this app.

With ``--studies http(s)://HOST/dicom-web`` MONAI Label 0.8.5 lists the series that match
``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` (default ``{"Modality": "CT"}``) as images, downloads
and converts each to NIfTI in a local cache on first use, stores final labels back in the
PACS as DICOM SEG and treats a series as labeled when a SEG references it. Its
``DICOMWebDatastore`` does not work with this app as it is; :class:`CoTrainDICOMwebDatastore`
fixes, on top of it:

- **writing SEG needs no download**: MONAI Label writes SEG with dcmqi's
  ``itkimage2segimage``, which it downloads from GitHub when the app starts (so a server that
  reaches only its PACS cannot start). Here SEG are written with ``pydicom-seg``, which MONAI
  Label also supports; segments are named after the app's labels.
- **labels are checked** against their series before anything is stored (HTTP 422 naming the
  problem, as for a studies folder); an all-background final label is refused, since a DICOM
  SEG needs at least one segment.
- **labels read back from SEG are usable**: MONAI Label converts a SEG into a ``.nrrd`` file
  in the segments' own geometry holding segment numbers; training needs NIfTI labels on the
  image's grid (and it stores the labeled series with the ``.nrrd``, so training would skip
  them). Here a SEG becomes a NIfTI label resampled onto its series' image, with each
  segment's value taken from its name when that is one of the app's labels (else its segment
  number). A submitted label is cached as read back from the SEG written for it, so training
  uses exactly what the PACS holds.
- **new labels count at once**: MONAI Label caches the list of labeled series for
  ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` (2 h), so ``min_labels`` would never be reached by
  submits; the cache is cleared after every saved final label, and a series with several SEG
  counts once.
- **no partial files**: series are downloaded into a temporary folder that is renamed when
  complete, and converted images and labels are copied into the cache atomically, so the
  server and its training and scoring processes never read half a file. The path returned
  is always the cached file (MONAI Label returns a temporary copy on first use, never
  removed).

Limits (MONAI Label's): a series that gets a new final label gets another SEG (the old one
stays in the PACS); a server whose cache lacks the label takes the first SEG the PACS lists
for it. Series added to the PACS show up after ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pydicom
import pydicom_seg
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastoreModel
from monailabel.datastore.utils.convert import dicom_to_nifti, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import remove_file
from pydicom.dataset import Dataset

from cotrain.files import atomic_copy
from cotrain.input_checks import (
    InvalidImageError,
    InvalidLabelError,
    UnsafeIdError,
    check_label_file,
    check_safe_id,
)
from lib.datastore import SEGMENTATION_TAGS

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
#: SeriesDescription of the SEG written for a final label.
SEG_SERIES_DESCRIPTION = "MONAI Label final label"


def _refusal(status_code: int, detail: str) -> HTTPException:
    logger.warning("refused (%d): %s", status_code, detail)
    return HTTPException(status_code=status_code, detail=detail)


def create_dicomweb_datastore(
    url: str, labels: Mapping[str, int], spatial_dims: int = 3
) -> CoTrainDICOMwebDatastore:
    """The DICOMweb datastore for ``url``, set up from MONAI Label's settings as MONAI Label
    0.8.5 does (``MONAILabelApp._init_dicomweb_datastore``), minus the dcmqi download.

    Google Cloud Healthcare URLs use the environment's Google credentials; other servers HTTP
    basic authentication when ``MONAI_LABEL_DICOMWEB_USERNAME`` and
    ``MONAI_LABEL_DICOMWEB_PASSWORD`` are set. ``MONAI_LABEL_QIDO_PREFIX``, ``_WADO_PREFIX``,
    ``_STOW_PREFIX``, ``MONAI_LABEL_DICOMWEB_CACHE_PATH``, ``_FETCH_BY_FRAME``,
    ``_CONVERT_TO_NIFTI`` and ``_SEARCH_FILTER`` apply as in MONAI Label.

    Args:
        url: The DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        labels: Label names to values that final labels may hold.
        spatial_dims: Spatial dimensions of images and labels.
    """
    logger.info("Using DICOMweb: %s", url)
    client: DICOMwebClient
    if "googleapis.com" in url:
        client = DICOMwebClient(url=url, session=create_session_from_gcp_credentials())
    else:
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(
                settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
            )
        client = DICOMwebClientX(
            url=url,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return CoTrainDICOMwebDatastore(
        client=client,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        labels=labels,
        spatial_dims=spatial_dims,
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
    )


def seg_to_label(seg_file: str, image_file: str, labels: Mapping[str, int], output: str) -> None:
    """Write a DICOM SEG as a NIfTI label on its image's grid.

    Each segment's voxels get the value of the app's label with the segment's name
    (SegmentLabel), or the segment number if the name is not one of ``labels``.

    Args:
        seg_file: The DICOM SEG file.
        image_file: The series' image as NIfTI (the label gets its grid).
        labels: Label names to values.
        output: The ``.nii.gz`` file to write.
    """
    dcm = pydicom.dcmread(seg_file)
    result = pydicom_seg.MultiClassReader().read(dcm)
    values = {}
    for segment in dcm.SegmentSequence:
        number = int(segment.SegmentNumber)
        values[number] = int(labels.get(str(segment.get("SegmentLabel", "")), number))
    lut = np.zeros(max([*values, 0]) + 1, dtype=np.int64)
    for number, value in values.items():
        lut[number] = value
    image = sitk.ReadImage(image_file)
    seg = sitk.Resample(
        result.image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16
    )
    voxels = lut[np.minimum(sitk.GetArrayFromImage(seg), len(lut) - 1)]
    label = sitk.GetImageFromArray(voxels.astype(np.uint8 if voxels.max() < 256 else np.uint16))
    label.CopyInformation(image)
    sitk.WriteImage(label, output, True)
    logger.info("SEG %s -> label values %s", os.path.basename(seg_file), sorted(values.values()))


class CoTrainDICOMwebDatastore(DICOMWebDatastore):
    """MONAI Label's ``DICOMWebDatastore`` with the fixes listed in the module docstring.

    Args:
        client: The DICOMweb client.
        search_filter: QIDO filter selecting the image series.
        labels: Label names to values that final labels may hold.
        spatial_dims: Spatial dimensions of images and labels.
        cache_path: Folder of the local cache (default ``~/.cache/monailabel/dicom``).
        fetch_by_frame: Download frame by frame (MONAI Label's option).
        convert_to_nifti: Convert series to NIfTI (needed by this app's tasks).
    """

    def __init__(
        self,
        client: DICOMwebClient,
        search_filter: dict[str, Any],
        labels: Mapping[str, int],
        spatial_dims: int = 3,
        cache_path: str | None = None,
        fetch_by_frame: bool = False,
        convert_to_nifti: bool = True,
    ) -> None:
        self.labels = dict(labels)
        self.spatial_dims = spatial_dims
        super().__init__(client, search_filter, cache_path, fetch_by_frame, convert_to_nifti)

    # ------------------------------------------------------------------ series
    def _study_of(self, series_id: str) -> str | None:
        """The StudyInstanceUID of a series, ``None`` if the server has no such series."""
        try:
            check_safe_id(series_id, "series id")
            found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_id})
        except (UnsafeIdError, requests.RequestException) as e:
            logger.info("no series %r: %s", series_id, e)
            return None
        for series in found:
            meta = Dataset.from_json(series)
            if str(meta.get("SeriesInstanceUID", "")) == series_id and meta.get("StudyInstanceUID"):
                return str(meta.StudyInstanceUID)
        return None

    def _download(self, series_id: str, dest: str) -> bool:
        """Download a series into folder ``dest`` (unless it is there); ``False`` if the
        server has no such series. The files arrive in a temporary folder renamed to ``dest``
        when complete."""
        if os.path.isdir(dest) and os.listdir(dest):
            return True
        study = self._study_of(series_id)
        if study is None:
            return False
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
        try:
            dicom_web_download_series(study, series_id, tmp, self._client, self._fetch_by_frame)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not (os.path.isdir(dest) and os.listdir(dest)):
                    raise
                # Another process completed the same download first.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def _store(self, image_id: str, file: str, tag: str | None, info: dict[str, Any]) -> str:
        """Copy an image (``tag`` ``None``) or a label atomically into the cache and record
        it in the cache's JSON; return the cached path."""
        _, ext = self._to_id(os.path.basename(file))
        name = self._filename(image_id, ext)
        folder = self._datastore.image_path() if tag is None else self._datastore.label_path(tag)
        dest = os.path.realpath(os.path.join(folder, name))
        atomic_copy(file, dest)
        info = {**info, "ts": int(time.time()), "name": name}
        with FileLock(self._lock_file):
            self._reload_locked()
            if tag is None:
                self._datastore.objects[image_id] = ImageLabelModel(
                    image=DataModel(info=info, ext=ext)
                )
            else:
                self._datastore.objects[image_id].labels[tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return dest

    def _reload_locked(self) -> None:
        """Re-read the cache's JSON if another process changed it (caller holds the lock)."""
        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            ts = os.stat(path).st_mtime
            with open(path) as f:
                model = LocalDatastoreModel.model_validate_json(f.read())
            model.base_path = self._datastore_path
            self._datastore = model
            self._config_ts = ts

    def get_image_uri(self, image_id: str) -> str:
        """The series as a cached NIfTI file (downloaded and converted on first use); ``""``
        if the server has no such series."""
        if not self._convert_to_nifti:
            return super().get_image_uri(image_id)
        try:
            check_safe_id(image_id, "image id")
        except UnsafeIdError:
            return ""
        image_path = self._datastore.image_path()
        cached = os.path.realpath(os.path.join(image_path, f"{image_id}.nii.gz"))
        if os.path.exists(cached):
            return cached
        if not self._download(image_id, os.path.join(image_path, image_id)):
            return ""
        converted = dicom_to_nifti(os.path.join(image_path, image_id))
        try:
            return self._store(image_id, converted, None, self._dicom_info(image_id))
        finally:
            remove_file(converted)

    # ------------------------------------------------------------------ labels
    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label as a cached NIfTI file; a final label comes from its SEG series
        ``label_id`` (converted by :func:`seg_to_label`) unless it is cached already.

        ``label_id`` may also be the image id (as in a local datastore), e.g. for
        ``GET /datastore/label``. Returns ``""`` if there is no such label or the SEG cannot
        be converted (logged).
        """
        if label_tag != FINAL or not self._convert_to_nifti:
            return super().get_label_uri(label_id, label_tag, image_id)
        label_path = self._datastore.label_path(FINAL)
        cached = os.path.realpath(os.path.join(label_path, f"{image_id or label_id}.nii.gz"))
        if os.path.exists(cached):
            return cached
        if not image_id:
            return ""
        seg_dir = os.path.join(label_path, label_id)
        image_uri = self.get_image_uri(image_id)
        if not image_uri or not self._download(label_id, seg_dir):
            return ""
        fd, converted = tempfile.mkstemp(suffix=".nii.gz")
        os.close(fd)
        try:
            seg_file = os.path.join(seg_dir, sorted(os.listdir(seg_dir))[0])
            seg_to_label(seg_file, image_uri, self.labels, converted)
            return self._store(image_id, converted, FINAL, self._dicom_info(label_id))
        except Exception as e:
            logger.warning("cannot use SEG %s as the label of %s: %s", label_id, image_id, e)
            return ""
        finally:
            remove_file(converted)

    def get_labeled_images(
        self, label_tag: str | None = None, labels: list[str] | None = None
    ) -> list[str]:
        """The image series that a SEG references (each once)."""
        return sorted(set(super().get_labeled_images(label_tag, labels)))

    def _forget_label_lists(self) -> None:
        """Clear MONAI Label's cached QIDO answer of the labeled series."""
        method = DICOMWebDatastore.get_labeled_images
        clear = getattr(method, "cache_clear", None) or getattr(method, "cache", {}).clear
        clear()

    def _segments(self, values: list[int], given: Any) -> list[dict[str, Any]]:
        """Segment descriptions for the label values present (named after the app's labels;
        a client's ``label_info`` entries with ``idx`` may add ``color`` and ``description``)."""
        names = {value: name for name, value in self.labels.items()}
        extra: dict[int, dict[str, Any]] = {}
        for entry in given if isinstance(given, list) else []:
            if isinstance(entry, dict) and str(entry.get("idx", "")).isdigit():
                keep = {k: entry[k] for k in ("color", "description") if k in entry}
                extra[int(entry["idx"])] = keep
        return [
            {
                **extra.get(value, {}),
                "name": names.get(value, f"label {value}"),
                "model_name": SEG_SERIES_DESCRIPTION,
            }
            for value in values
        ]

    def save_label(
        self,
        image_id: str,
        label_filename: str,
        label_tag: str,
        label_info: dict[str, Any],
        label_id: str = "",
    ) -> str:
        """Check a label against its series, then store it: a final label also as a DICOM
        SEG in the PACS.

        Returns:
            The label id (the image id).

        Raises:
            HTTPException: 404 (no such series), 422 (the label does not fit or is all
                background), 502 (the PACS did not confirm storing the SEG).
        """
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise _refusal(404, f"image {image_id!r} is not a series of {self.name()}")
        try:
            check_safe_id(label_tag, "label tag")
            values = check_label_file(
                label_filename,
                image_uri,
                self.labels if label_tag in SEGMENTATION_TAGS else None,
                self.spatial_dims,
            )
        except (UnsafeIdError, InvalidLabelError, InvalidImageError) as e:
            raise _refusal(422, f"label for {image_id} rejected: {e}") from None
        info = dict(label_info or {})
        if label_tag == FINAL:
            present = [int(v) for v in values if v != 0]
            if not present:
                raise _refusal(
                    422,
                    f"label for {image_id} rejected: it is all background, and a DICOM SEG "
                    "needs at least one segment",
                )
            series_dir = os.path.join(self._datastore.image_path(), image_id)
            segments = self._segments(present, info.get("label_info"))
            seg_file = nifti_to_dicom_seg(series_dir, label_filename, segments, use_itk=False)
            # The cache keeps the label as read back from the SEG, i.e. what the PACS holds.
            fd, from_seg = tempfile.mkstemp(suffix=".nii.gz")
            os.close(fd)
            try:
                seg_to_label(seg_file, image_uri, self.labels, from_seg)
                seg_series = dicom_web_upload_dcm(seg_file, self._client)
                if not seg_series:
                    raise _refusal(
                        502, f"{self.name()} did not confirm storing the SEG of {image_id}"
                    )
                image_info = self.get_image_info(image_id)
                info.update(
                    {
                        "SeriesInstanceUID": seg_series,
                        "Modality": image_info.get("Modality"),
                        "PatientID": image_info.get("PatientID"),
                        "StudyInstanceUID": image_info.get("StudyInstanceUID"),
                    }
                )
                self._store(image_id, from_seg, label_tag, info)
            finally:
                remove_file(seg_file)
                remove_file(from_seg)
            self._forget_label_lists()
            logger.info("stored the label of %s as SEG series %s", image_id, seg_series)
            return image_id
        self._store(image_id, label_filename, label_tag, info)
        return image_id
