"""Image loading and resizing, exactly as the model's own processor would resize.

Everything here is synchronous, CPU-bound and free of shared state on purpose: the job
runner calls ``prepare_source`` in a worker process (or, on small machines, a thread;
see ``preprocess``), so decoding a 4K screenshot stalls neither the event loop nor, in
process mode, vLLM's output processing, which shares this process's GIL.

Why pre-resize at all: vLLM would resize too, but inside its input processing, which
runs on the engine's event loop one request at a time. Resizing here with the
processor's own geometry (``smart_resize``) and its own resampling gives the same pixels,
in parallel across jobs, and the resized size the grounding mode must state in its prompt.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_worker.adapters.cpython import ascii_view
from vlm_worker.adapters.transformers import (
    convert_to_rgb,
    is_torchvision_processor,
    torchvision_resize,
)
from vlm_worker.contract.errors import ImageDecodeError, InvalidInput
from vlm_worker.media.geometry import ImageGeometry

if TYPE_CHECKING:
    import torch

#: Formats Pillow may decode. Anything else (EPS runs Ghostscript, for one) is refused
#: before a decoder runs.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


@dataclass(frozen=True, repr=False)
class PreparedImage:
    """A decoded, resized RGB image and what the client should know about it."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height), as clients usually write sizes
    #: The size the model sees; None where vLLM's processor resizes (``media.families``).
    resized_size: tuple[int, int] | None
    format: str
    nbytes: int
    sha256: str  # of the encoded bytes

    @property
    def digest(self) -> str:
        """A short, log-safe identity of the image."""
        return self.sha256[:16]

    @property
    def content_id(self) -> str:
        """Names the pixels handed to vLLM: the bytes, and the size they were resized to.

        Given to vLLM as the item's ``multi_modal_uuids`` entry, so it does not hash the
        pixels itself (a copy and a hash of every image on its event loop); equal ids mean
        equal pixels, which is what its processor and prefix caches need.
        """
        if self.resized_size is None:
            return f"{self.sha256}-original"
        w, h = self.resized_size
        resized = self.image.size == self.resized_size
        return f"{self.sha256}-{w}x{h}" + ("" if resized else "-original")

    def __repr__(self) -> str:
        resized = (
            "processor" if self.resized_size is None else "x".join(map(str, self.resized_size))
        )
        return (
            f"PreparedImage({self.format} {self.original_size[0]}x{self.original_size[1]}"
            f"->{resized}, {self.nbytes} bytes, sha256:{self.digest})"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "original_size": list(self.original_size),
            "resized_size": None if self.resized_size is None else list(self.resized_size),
            "format": self.format,
            "bytes": self.nbytes,
        }


def is_url(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))


def decode_inline(
    source: str,
    field: str,
    max_bytes: int,
    *,
    media: str = "image",
    limit_name: str = "MAX_IMAGE_BYTES",
) -> bytes:
    """Bytes from a ``data:`` URI or raw base64; other schemes are refused by name.

    Only C code that releases the GIL touches the payload (it can be tens of MB): a
    Python regex over it, or a mere copy of it, would hold the GIL for its whole length
    and stall every other job's stream. ``media`` is the MIME major type a data URI must
    carry and the word the errors use, so video shares this path (``media.video``);
    ``limit_name`` is the setting the size error tells the client about.
    """
    text = source.strip()  # the same object, uncopied, when there is nothing to strip
    head = text[:256]
    match = _DATA_URI.match(head)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith(f"{media}/"):
            raise InvalidInput(f"data URI has media type {mime!r}; expected {media}/*", field=field)
        start = match.end()
    elif head[:5].lower() == "data:":
        raise InvalidInput(
            f"data URI must be base64-encoded (data:{media}/...;base64,...)", field=field
        )
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", head):
        scheme = head.split("://", 1)[0].lower()
        raise InvalidInput(
            f"{media} URL scheme {scheme!r} is not supported; use http(s)://, a data: URI "
            f"or raw base64",
            field=field,
        )
    else:
        start = 0
    too_large = f"{media} is larger than {limit_name}={max_bytes} bytes"
    # base64 inflates by 4/3: refuse oversized payloads before decoding them (line breaks
    # in wrapped base64 do not count).
    limit = (max_bytes * 4) // 3 + 4
    if len(text) - start > limit and len("".join(text[start:].split())) > limit:
        raise InvalidInput(too_large, field=field)
    try:
        data = _b64decode_strict(text, start)  # what nearly every client sends
    except (binascii.Error, ValueError):
        data = _decode_lenient(text[start:], field, media)
    if not data:
        raise InvalidInput(f"{media} is empty", field=field)
    if len(data) > max_bytes:
        raise InvalidInput(too_large, field=field)
    return data


def _b64decode_strict(text: str, start: int) -> bytes:
    """``text[start:]`` as strict base64, read in place by pybase64 with the GIL released.

    pybase64 (SIMD; vLLM decodes data URLs with it too), not the standard library: it is
    many times faster on a screenshot's payload and releases the GIL, which ``base64``
    holds throughout. Reading the payload in place (``ascii_view``) spares the copy that
    slicing off the header would make while holding the GIL
    (``docs/decisions/0007-gil-sparing-decoding.md``). Same validation as the
    standard library: any character outside the alphabet, or padding out of place, is
    refused.
    """
    with ascii_view(text) as view:
        if view is None:  # not ASCII: not valid base64 either, but let pybase64 say so
            return pybase64.b64decode(text[start:], validate=True)
        return pybase64.b64decode(view[start:], validate=True)


def _decode_lenient(payload: str, field: str, media: str) -> bytes:
    """Wrapped lines, missing padding and the URL-safe alphabet, still strictly validated."""
    compact = "".join(payload.split())
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return pybase64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{media} base64 is invalid (the {media} is neither an http(s) URL, a data: URI "
            f"nor valid base64)",
            field=field,
        ) from None


def read_header(data: bytes, field: str, max_source_pixels: int) -> Image.Image:
    """Open an image without decoding its pixels, refusing bombs and unknown formats.

    Pillow reads only the header in ``Image.open``; the size check happens before any
    decoder allocates the pixels.
    """
    try:
        with warnings.catch_warnings():
            # Our own limit (below) decides; Pillow's warning threshold is not ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a supported image; accepted formats: {', '.join(ALLOWED_FORMATS)}", field=field
        ) from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(
            f"image is larger than Pillow's hard limit of {2 * Image.MAX_IMAGE_PIXELS} pixels "
            f"(MAX_IMAGE_SOURCE_PIXELS={max_source_pixels})",
            field=field,
        ) from None
    except Exception as exc:  # Pillow raises many types for broken headers
        raise ImageDecodeError(f"cannot read image header: {exc}", field=field) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})", field=field)
    if width * height > max_source_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, above "
            f"MAX_IMAGE_SOURCE_PIXELS={max_source_pixels}",
            field=field,
        )
    check_declared_work(img, data, field)
    return img


#: Most scans a JPEG may have. A progressive JPEG's encoder writes about ten; each scan
#: makes libjpeg walk the whole image again, so thousands of (empty) scans in a small file
#: cost seconds of CPU while the header passes every size check.
MAX_JPEG_SCANS = 64
#: A TIFF tile may be larger than the image (encoders use 256x256 tiles even for icons),
#: but libtiff allocates whole tiles: one far larger than the image is a memory bomb.
MAX_TIFF_TILE_PIXELS = 4096 * 4096


def check_declared_work(img: Image.Image, data: bytes, field: str) -> None:
    """Refuse, before decoding, a file whose structure declares far more work than its
    size: the pixel guard above reads only the image size."""
    if img.format == "JPEG":
        scans = data.count(b"\xff\xda")  # SOS markers; 0xFF in scan data is stuffed
        if scans > MAX_JPEG_SCANS:
            raise ImageDecodeError(
                f"JPEG has {scans} scans, above the {MAX_JPEG_SCANS} any encoder writes "
                "(each scan decodes the whole image again)",
                field=field,
            )
    elif img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        tile_w, tile_h = tags.get(322), tags.get(323)  # TileWidth, TileLength
        if tile_w is not None and tile_h is not None:
            width, height = img.size
            limit = max(MAX_TIFF_TILE_PIXELS, 4 * width * height)
            if int(tile_w) * int(tile_h) > limit:
                raise ImageDecodeError(
                    f"TIFF tiles are {tile_w}x{tile_h} for a {width}x{height} image, above "
                    f"{limit} pixels per tile (the decoder would allocate whole tiles)",
                    field=field,
                )


def open_image(data: bytes, field: str, max_source_pixels: int) -> tuple[Image.Image, str]:
    """Decode to an RGB image with EXIF orientation applied, refusing bombs before decoding."""
    pixels, fmt = decode_pixels(data, field, max_source_pixels)
    return as_pil(pixels), fmt


#: The pixels of a decoded image: an RGB ``PIL.Image``, or, from the fast PNG path, a
#: ``(3, height, width)`` uint8 tensor (the layout the processor's resize takes).
Pixels = Any


def decode_pixels(data: bytes, field: str, max_source_pixels: int) -> tuple[Pixels, str]:
    """The upright RGB pixels of an encoded image, and its format.

    Plain 8-bit RGB and RGBA PNGs, what screenshots are, are decoded by libpng
    (``png_pixels``); every other image, and any PNG that libpng refuses, by Pillow.
    """
    img = read_header(data, field, max_source_pixels)
    fmt = img.format or "unknown"
    fast = png_pixels(img, data)
    if fast is not None:
        if fast.shape[0] == 3:
            return fast, fmt
        # RGBA: composited on white by Pillow exactly as the processor would (below).
        return _to_rgb(Image.fromarray(fast.permute(1, 2, 0).numpy())), fmt
    try:
        img.seek(0)  # animated GIF/WebP: the first frame
        img.load()
        # in place: without an orientation tag the copying form duplicates the whole
        # image (25 MB for 4K) while holding the GIL.
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img), fmt
    except Exception as exc:
        raise ImageDecodeError(f"image data is truncated or corrupt: {exc}", field=field) from None


# IHDR is the first chunk: its bit depth and colour type sit at fixed offsets.
_PNG_BIT_DEPTH, _PNG_COLOR_TYPE = 24, 25
_PNG_RGB, _PNG_RGBA = 2, 6
#: Chunks that make Pillow do what libpng would not: an orientation, transparency, frames.
_PILLOW_CHUNKS = frozenset({b"eXIf", b"tRNS", b"acTL"})
#: Text chunks, and the keywords under which Pillow reads an orientation from one: EXIF
#: as a hex "raw profile", or XMP's ``tiff:Orientation``.
_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_ORIENTATION_KEYWORDS = frozenset({b"Raw profile type exif", b"XML:com.adobe.xmp"})


def _png_chunks(data: bytes) -> set[bytes]:
    """The chunk types of a PNG, read from the chunk headers alone.

    A walk of the headers alone (a 4K screenshot's pixel data comes in 64 KB chunks):
    searching the whole file for a chunk name held the GIL far longer and could be fooled
    by the compressed bytes.
    """
    types, pos, end = set(), 8, len(data)
    while pos + 8 <= end:
        kind = data[pos + 4 : pos + 8]
        types.add(kind)
        if kind == b"IEND":
            break
        length = int.from_bytes(data[pos : pos + 4], "big")
        if kind in _TEXT_CHUNKS:  # its keyword: up to 79 bytes before a NUL
            keyword = data[pos + 8 : pos + 8 + min(length, 80)].split(b"\0", 1)[0]
            if keyword in _ORIENTATION_KEYWORDS:
                types.add(b"orientation")
        pos += 12 + length
    return types


def png_pixels(img: Image.Image, data: bytes) -> torch.Tensor | None:
    """A plain 8-bit RGB(A) PNG's pixels from libpng (torchvision), or None for Pillow.

    Why: libpng is faster on screenshots and runs with the GIL released throughout, where
    Pillow's loop re-takes it for every chunk and delays every other thread
    (``docs/decisions/0007-gil-sparing-decoding.md``). PNG is lossless, so both decoders give
    the same bytes for what this accepts: 8 bits per channel, RGB or RGBA (libpng would
    hand back palette indices or grey as they are), no colour-key transparency (``tRNS``:
    rare in screenshots, left to Pillow out of caution), no ``eXIf`` chunk (an
    orientation Pillow would apply), not animated. Gamma and colour profiles are
    ignored by both. Anything else, or a file libpng refuses (it checks every chunk's
    CRC, Pillow does not), returns None and goes through Pillow as before.
    """
    if img.format != "PNG" or len(data) < 33 or data[_PNG_BIT_DEPTH] != 8:
        return None
    if data[_PNG_COLOR_TYPE] not in (_PNG_RGB, _PNG_RGBA):
        return None
    chunks = _png_chunks(data)
    if not chunks.isdisjoint(_PILLOW_CHUNKS) or b"orientation" in chunks:
        return None  # tRNS, eXIf, acTL (animation), or an orientation in a text chunk
    try:
        import torch

        with warnings.catch_warnings():  # torchvision.io's video part warns about torch.jit
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_png
    except ImportError:  # pragma: no cover - images still decode, through Pillow
        return None
    try:
        with warnings.catch_warnings():  # read-only bytes: libpng only reads them
            warnings.simplefilter("ignore", UserWarning)
            encoded = torch.frombuffer(data, dtype=torch.uint8)
        pixels = decode_png(encoded, ImageReadMode.UNCHANGED)
    except Exception:  # RuntimeError from libpng; Pillow gets the file and the last word
        return None
    channels = 3 if data[_PNG_COLOR_TYPE] == _PNG_RGB else 4
    if pixels.dtype != torch.uint8 or tuple(pixels.shape) != (channels, *img.size[::-1]):
        return None
    return pixels


def as_pil(pixels: Pixels) -> Image.Image:
    """An RGB ``PIL.Image`` of decoded pixels (a copy when they are a tensor)."""
    if isinstance(pixels, Image.Image):
        return pixels
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def pixel_size(pixels: Pixels) -> tuple[int, int]:
    """(width, height) of decoded pixels."""
    if isinstance(pixels, Image.Image):
        return pixels.size
    return int(pixels.shape[2]), int(pixels.shape[1])


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the processor's ``convert_to_rgb`` would, except 16-bit grey, which is scaled.

    Pillow's own 16-bit → 8-bit conversion clips (most of the image turns white); scaling
    keeps the picture. 32-bit ``I`` images go through Pillow as the processor would.
    """
    if img.mode.startswith("I;16"):
        import numpy as np

        grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        img = Image.fromarray(grey, mode="L")
    return convert_to_rgb(img)


def resize_like_processor(pixels: Pixels, size_hw: tuple[int, int], processor: Any) -> Image.Image:
    """Resize with the same resampler the model's image processor uses.

    vLLM loads the torchvision ("fast") processor, whose bicubic differs slightly from
    Pillow's; calling its own ``resize`` keeps the pixels identical to what the model
    would have seen without our pre-resize. A PIL-backend processor gets Pillow bicubic.
    ``pixels`` from the fast PNG path are already the tensor that resize takes, so the
    25 MB PIL-to-tensor copy of a 4K image is skipped.
    """
    height, width = size_hw
    if pixel_size(pixels) == (width, height):
        return as_pil(pixels)
    resample = getattr(processor, "resample", Image.Resampling.BICUBIC)
    if is_torchvision_processor(processor):
        from torchvision.transforms.v2 import functional as tvf

        if isinstance(pixels, Image.Image):
            pixels = tvf.pil_to_tensor(pixels)
        return tvf.to_pil_image(torchvision_resize(processor, pixels, height, width, resample))
    return as_pil(pixels).resize((width, height), resample=Image.Resampling(int(resample)))


def prepare_image(
    data: bytes,
    *,
    field: str,
    geometry: ImageGeometry | None,
    processor: Any,
    max_source_pixels: int,
) -> PreparedImage:
    """Decode, orient, convert and resize one image (CPU-bound: call it off the event loop).

    Without a ``geometry`` (a family whose resize the worker does not reproduce) the
    upright RGB image goes to vLLM at full size, and its processor resizes it.
    """
    pixels, fmt = decode_pixels(data, field, max_source_pixels)
    width, height = pixel_size(pixels)
    if geometry is None:
        return PreparedImage(
            image=as_pil(pixels),
            original_size=(width, height),
            resized_size=None,
            format=fmt,
            nbytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
    new_h, new_w = geometry.target_size(height, width, field)
    # Pre-resize only when the processor will leave our output alone: smart_resize of the
    # target must be the target (not so for near-200:1 images or tiny max_pixels). Else
    # the processor gets the original and resizes it once, to the same target size.
    if geometry.is_fixed_point(new_h, new_w):
        if geometry.resample == "pillow" and (width, height) != (new_w, new_h):
            img = as_pil(pixels).resize((new_w, new_h), Image.Resampling.BICUBIC)
        else:
            img = resize_like_processor(pixels, (new_h, new_w), processor)
    else:
        img = as_pil(pixels)
    return PreparedImage(
        image=img,
        original_size=(width, height),
        resized_size=(new_w, new_h),
        format=fmt,
        nbytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


@dataclass(frozen=True)
class ImageLimits:
    """The per-image caps, from the settings (a picklable pair for worker processes)."""

    max_bytes: int
    max_source_pixels: int


def prepare_source(
    source: str | bytes,
    *,
    field: str,
    geometry: ImageGeometry | None,
    processor: Any,
    limits: ImageLimits,
) -> PreparedImage:
    """An inline image (data URI or raw base64) or fetched bytes, decoded and resized.

    The whole CPU-bound path in one call, so a job's image makes one trip to a worker.
    """
    data = source if isinstance(source, bytes) else decode_inline(source, field, limits.max_bytes)
    return prepare_image(
        data,
        field=field,
        geometry=geometry,
        processor=processor,
        max_source_pixels=limits.max_source_pixels,
    )
