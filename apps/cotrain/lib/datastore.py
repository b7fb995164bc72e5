"""The studies folder as a MONAI Label local datastore that checks what it is given and never
leaves a half-written file.

MONAI Label's ``LocalDatastore`` stores whatever a client uploads, under whatever id or tag
the client names, and writes files and its ``datastore_v2.json`` in place. This subclass:

- refuses image ids and label tags that would leave the studies folder (HTTP 400);
- refuses a label for an unknown image (HTTP 404);
- checks every label against its image before anything is written (HTTP 422 naming the
  problem; see :func:`cotrain.input_checks.check_label_file`): a rejected upload leaves the
  folder and its JSON exactly as they were;
- checks an uploaded image the same way (:func:`cotrain.input_checks.check_image_file`);
- writes labels, images and the JSON to a temporary file that is then renamed into place
  (:func:`cotrain.files.atomic_write`), so a crash leaves the old or the new version;
- changes the JSON only under one file lock, re-reading it first, so the server and its
  training and scoring subprocesses never drop each other's changes;
- moves an unreadable JSON aside at start-up and rebuilds it from the files (labels are the
  files in ``labels/``, so none is lost).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import (
    DataModel,
    ImageLabelModel,
    LocalDatastore,
    LocalDatastoreModel,
)
from monailabel.interfaces.datastore import DefaultLabelTag

from cotrain.files import atomic_copy, atomic_write
from cotrain.input_checks import (
    InvalidImageError,
    InvalidLabelError,
    UnsafeIdError,
    check_image_file,
    check_label_file,
    check_safe_id,
)

logger = logging.getLogger(__name__)

#: Label tags whose voxels must be label values (others, e.g. ``uncertainty`` maps, are only
#: checked for their grid and finite values).
SEGMENTATION_TAGS = (DefaultLabelTag.FINAL.value, DefaultLabelTag.ORIGINAL.value)


def _refusal(status_code: int, detail: str) -> HTTPException:
    """The HTTP error a client gets for a refused request (also logged: who sent what)."""
    logger.warning("refused (%d): %s", status_code, detail)
    return HTTPException(status_code=status_code, detail=detail)


def _bad_request(error: UnsafeIdError) -> HTTPException:
    return _refusal(400, f"refused: {error}")


class CheckedLocalDatastore(LocalDatastore):
    """A ``LocalDatastore`` that validates uploads and writes atomically (see the module doc).

    Args:
        datastore_path: The studies folder.
        labels: Label names to values that final and original labels may hold.
        spatial_dims: Spatial dimensions of images and labels.
        **kwargs: ``LocalDatastore`` arguments (``extensions``, ``auto_reload``, ...).
    """

    def __init__(
        self,
        datastore_path: str,
        labels: Mapping[str, int],
        spatial_dims: int = 3,
        **kwargs: Any,
    ) -> None:
        self.labels = dict(labels)
        self.spatial_dims = spatial_dims
        # One lock object per datastore: re-entrant within a thread (a read-modify-write
        # holds it while the methods it calls take it again), exclusive between threads and
        # processes (each thread opens the lock file itself).
        self._file_lock = FileLock(os.path.join(datastore_path, ".lock"))
        super().__init__(datastore_path, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            # Atomic writes arrive as renames, which LocalDatastore's watcher ignores.
            handler.on_moved = self._on_moved_event

    # ------------------------------------------------------------------ checks
    def _checked_image(self, image_id: str) -> ImageLabelModel:
        """The datastore entry of ``image_id``; HTTP 400 for an unsafe id, 404 if unknown."""
        try:
            check_safe_id(image_id, "image id")
        except UnsafeIdError as e:
            raise _bad_request(e) from None
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise _refusal(404, f"image {image_id!r} is not in the datastore")
        return obj

    def check_label(self, image_id: str, label_filename: str, label_tag: str) -> list[int]:
        """Check a label file for ``image_id`` without storing it.

        Returns:
            The label values present.

        Raises:
            HTTPException: 400 (unsafe id or tag), 404 (unknown image) or 422 (the label does
                not fit; the detail names the problem).
        """
        try:
            check_safe_id(label_tag, "label tag")
        except UnsafeIdError as e:
            raise _bad_request(e) from None
        self._checked_image(image_id)
        labels = self.labels if label_tag in SEGMENTATION_TAGS else None
        try:
            return check_label_file(
                label_filename, self.get_image_uri(image_id), labels, self.spatial_dims
            )
        except (InvalidLabelError, InvalidImageError) as e:
            raise _refusal(422, f"label for {image_id} rejected: {e}") from None

    # ------------------------------------------------------------------ writes
    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]
    ) -> str:
        """Check the label (see :meth:`check_label`), then store it atomically.

        Returns:
            The label id (the image id).
        """
        self._reload()
        values = self.check_label(image_id, label_filename, label_tag)
        _, label_ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, label_ext)
        label_path = self._datastore.label_path(label_tag)
        logger.info("saving label %s (tag %s, values %s)", image_id, label_tag, values)
        with self._file_lock:
            self._reload()
            obj = self._checked_image(image_id)
            os.makedirs(label_path, exist_ok=True)
            atomic_copy(label_filename, os.path.join(label_path, name))
            info = dict(label_info or {})
            info.update({"ts": int(time.time()), "name": name})
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file()
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Check an uploaded image (safe id, readable volume), then store it atomically.

        Returns:
            The image id.

        Raises:
            HTTPException: 400 (unsafe id) or 422 (the image cannot be used; the detail says why).
        """
        default_id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or default_id
        try:
            check_safe_id(image_id, "image id")
        except UnsafeIdError as e:
            raise _bad_request(e) from None
        try:
            check_image_file(image_filename, self.spatial_dims)
        except InvalidImageError as e:
            raise _refusal(422, f"image {image_id} rejected: {e}") from None
        name = self._filename(image_id, image_ext)
        with self._file_lock:
            self._reload()
            atomic_copy(image_filename, os.path.join(self._datastore.image_path(), name))
            info = dict(image_info or {})
            info.update({"ts": int(time.time()), "name": name})
            self._datastore.objects[image_id] = ImageLabelModel(
                image=DataModel(info=info, ext=image_ext)
            )
            self._update_datastore_file()
        logger.info("added image %s", image_id)
        return image_id

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Re-read the JSON, update the image's info and write it, under the lock."""
        with self._file_lock:
            self._reload()
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """Re-read the JSON, update the label's info and write it, under the lock."""
        with self._file_lock:
            self._reload()
            super().update_label_info(label_id, label_tag, info)

    def _reconcile_datastore(self) -> None:
        with self._file_lock:
            super()._reconcile_datastore()

    # ------------------------------------------------------------------ the JSON file
    def _reload(self) -> None:
        self._init_from_datastore_file()

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Re-read the JSON if it changed on disk. An unreadable one (e.g. written by a version
        without atomic writes that crashed) is moved aside and rebuilt from the files."""
        path = self._datastore_config_path
        with self._file_lock:
            if not os.path.exists(path):
                return
            ts = os.stat(path).st_mtime
            if ts == self._config_ts:
                return
            try:
                with open(path) as f:
                    model = LocalDatastoreModel.model_validate_json(f.read())
            except ValueError as e:
                aside = f"{path}.unreadable-{int(time.time())}"
                logger.error("datastore file %s is unreadable (%s); moved to %s", path, e, aside)
                os.replace(path, aside)
                self._config_ts = 0
                return
            model.base_path = self._datastore_path
            self._datastore = model
            self._config_ts = ts

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write the JSON atomically (temporary file, fsync, rename), under the lock."""
        with self._file_lock:
            with atomic_write(self._datastore_config_path, "w") as f:
                json.dump(
                    self._datastore.model_dump(exclude={"base_path"}), f, indent=2, default=str
                )
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _on_moved_event(self, event: Any) -> None:
        """A file renamed into the folder: the JSON (re-read it) or an image or label."""
        if os.path.realpath(event.dest_path) == os.path.realpath(self._datastore_config_path):
            self._reload()
        else:
            self._on_any_event(event)
