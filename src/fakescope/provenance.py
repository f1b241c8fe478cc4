"""Provenance evidence: what an image file says about its own origin.

Many generated images say so in their metadata: C2PA Content Credentials (DALL-E 3, Adobe Firefly,
Bing Image Creator; some cameras sign real photos too), the IPTC ``DigitalSourceType``
``trainedAlgorithmicMedia`` in XMP, PNG text chunks written by Stable Diffusion front-ends
(``parameters`` from AUTOMATIC1111 / Forge / SD.Next / Fooocus, ``prompt`` and ``workflow`` from
ComfyUI, ``invokeai_metadata`` / ``sd-metadata`` from InvokeAI), EXIF ``Software`` naming a generator.

:func:`inspect_provenance` reports what it found, as separate evidence: it never changes a detector's
``p_ai``. Missing metadata proves nothing: most re-uploads and screenshots strip it.

C2PA manifests are read and their signatures validated by ``c2pa-python`` when it is installed
(``pip install 'fakescope[provenance]'``); without it ``c2pa`` is null and ``c2pa_checked`` false.
PNG text chunks are read by a small chunk walker rather than Pillow because Pillow refuses a whole
file over one bad chunk checksum and silently blanks an undecodable compressed chunk, and a
forensic report must say which chunk was malformed; EXIF goes through Pillow.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

MAX_READ = 64 * 2**20          # bytes of a file read for metadata
TEXT_PREVIEW = 300             # characters of a text chunk kept in the report
IPTC_DST = "http://cv.iptc.org/newscodes/digitalsourcetype/"
AI_SOURCE_TYPES = {"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "algorithmicMedia",
                   "compositeSynthetic"}
# generator names as they appear in EXIF Software / C2PA claim generators (lower case, word-bounded)
GENERATOR_SOFTWARE = ("stable diffusion", "stable-diffusion", "automatic1111", "comfyui", "invokeai", "fooocus",
                   "novelai", "midjourney", "dall-e", "dall·e", "dalle", "openai", "chatgpt", "firefly",
                   "bing image creator", "image creator", "imagen", "gemini", "leonardo", "ideogram", "flux",
                   "sdxl", "dreamstudio", "nightcafe", "craiyon", "kandinsky", "runway", "playground", "krea")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DST_RE = re.compile(rb"DigitalSourceType\s*(?:=\s*[\"']|>\s*(?:<rdf:li[^>]*>)?\s*)([^\"'<\s]+)")
_XMP_RE = re.compile(rb"<x:xmpmeta.*?</x:xmpmeta>", re.S)
_PNG_HINTS = {  # text-chunk keyword -> hint
    "parameters": "stable-diffusion (PNG parameters chunk)",
    "prompt": "comfyui (PNG prompt chunk)",
    "workflow": "comfyui (PNG workflow chunk)",
    "invokeai_metadata": "invokeai (PNG invokeai_metadata chunk)",
    "sd-metadata": "invokeai (PNG sd-metadata chunk)",
    "dream": "invokeai (PNG Dream chunk)",
    "fooocus_scheme": "fooocus (PNG fooocus_scheme chunk)",
}


def _short(s: str, n: int = TEXT_PREVIEW) -> str:
    return s if len(s) <= n else s[:n] + f"... ({len(s)} characters)"


def _generator_in(text: str) -> str | None:
    t = text.lower()
    for name in GENERATOR_SOFTWARE:
        if re.search(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", t):
            return name
    return None


# --- PNG text chunks ----------------------------------------------------------------------------------

def png_text_chunks(data: bytes) -> tuple[dict[str, str], list[str]]:
    """``({keyword: text}, problems)`` of a PNG's tEXt / zTXt / iTXt chunks; every malformed chunk
    (checksum, truncation, undecodable compression or text) becomes a problem, the rest are kept."""
    texts: dict[str, str] = {}
    problems: list[str] = []
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        name = ctype.decode("latin-1", "replace")
        end = pos + 12 + length
        if end > len(data):
            problems.append(f"PNG chunk {name} at byte {pos}: truncated ({length} bytes declared, "
                            f"{max(0, len(data) - pos - 12)} present)")
            break
        body = data[pos + 8:pos + 8 + length]
        if ctype in (b"tEXt", b"zTXt", b"iTXt"):
            (crc,) = struct.unpack(">I", data[pos + 8 + length:end])
            if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
                problems.append(f"PNG chunk {name} at byte {pos}: checksum mismatch (chunk corrupted or edited)")
            try:
                key, text = _decode_text_chunk(ctype, body)
                texts[key] = text
            except (ValueError, zlib.error, UnicodeDecodeError) as e:
                problems.append(f"PNG chunk {name} at byte {pos}: {e}")
        if ctype == b"IEND":
            break
        pos = end
    return texts, problems


def _decode_text_chunk(ctype: bytes, body: bytes) -> tuple[str, str]:
    if b"\x00" not in body:
        raise ValueError("no keyword separator")
    key_b, rest = body.split(b"\x00", 1)
    key = key_b.decode("latin-1")
    if not 1 <= len(key) <= 79:
        raise ValueError(f"keyword of {len(key)} characters (expected 1-79)")
    if ctype == b"tEXt":
        return key, rest.decode("latin-1")
    if ctype == b"zTXt":
        if not rest or rest[0] != 0:
            raise ValueError("unknown compression method")
        return key, _inflate(rest[1:]).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, text
    if len(rest) < 2:
        raise ValueError("truncated iTXt header")
    flag, method, rest = rest[0], rest[1], rest[2:]
    parts = rest.split(b"\x00", 2)
    if len(parts) != 3:
        raise ValueError("truncated iTXt header")
    raw = parts[2]
    if flag:
        if method != 0:
            raise ValueError("unknown compression method")
        raw = _inflate(raw)
    return key, raw.decode("utf-8")


def _inflate(raw: bytes, limit: int = 8 * 2**20) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(raw, limit)
    if d.unconsumed_tail:
        raise ValueError(f"compressed text larger than {limit} bytes")
    if not d.eof:
        raise ValueError("compressed text is truncated")
    return out


# --- XMP, EXIF --------------------------------------------------------------------------------------

def xmp_digital_source_type(data: bytes) -> str | None:
    """The IPTC DigitalSourceType term (e.g. ``trainedAlgorithmicMedia``) of the file's XMP packets."""
    for packet in _XMP_RE.findall(data):
        m = _DST_RE.search(packet)
        if m:
            return m.group(1).decode("utf-8", "replace").rstrip("/").rsplit("/", 1)[-1]
    return None


def exif_fields(data: bytes) -> tuple[dict[str, str], list[str]]:
    """EXIF Software / Make / Model / ImageDescription / Artist through Pillow (any format it reads)."""
    from PIL import Image, UnidentifiedImageError

    tags = {0x0131: "Software", 0x010F: "Make", 0x0110: "Model", 0x010E: "ImageDescription", 0x013B: "Artist"}
    try:
        with Image.open(io.BytesIO(data)) as im:
            exif = im.getexif()
            out = {name: _short(str(exif[t]).strip("\x00 ")) for t, name in tags.items()
                   if t in exif and str(exif[t]).strip("\x00 ")}
            return out, []
    except UnidentifiedImageError:
        return {}, []  # not an image Pillow reads: the pixel model reports that
    except Exception as e:  # a malformed EXIF block: report it, keep the rest of the evidence
        return {}, [f"EXIF: {type(e).__name__}: {_short(str(e), 120)}"]


# --- C2PA ---------------------------------------------------------------------------------------------

def c2pa_available() -> bool:
    try:
        import c2pa  # noqa: F401
    except ImportError:
        return False
    return True


def _c2pa_context():
    """Settings that keep the reader offline: no remote manifests, no OCSP queries."""
    import c2pa

    try:
        settings = c2pa.Settings.from_json(json.dumps({"verify": {"remote_manifest_fetch": False,
                                                                  "ocsp_fetch": False}}))
        return c2pa.Context(settings)
    except Exception:  # an older/newer library without these settings: its defaults
        return None


def read_c2pa(data: bytes, path: str = "") -> tuple[dict | None, list[str]]:
    """The active C2PA manifest in a summary, with the library's validation verdict, or None."""
    import c2pa

    ctx = _c2pa_context()
    fmt = _mime(data, path)
    try:
        kw = {"context": ctx} if ctx is not None else {}
        reader = c2pa.Reader.try_create(fmt, io.BytesIO(data), **kw)
    except Exception as e:
        return None, [f"C2PA: {_short(str(e), 160)}"]
    if reader is None:
        return None, []
    try:
        store = json.loads(reader.json())
    finally:
        reader.close()
    label = store.get("active_manifest")
    m = (store.get("manifests") or {}).get(label) or {}
    actions = []
    for a in m.get("assertions") or []:
        if str(a.get("label", "")).startswith("c2pa.actions"):
            for act in (a.get("data") or {}).get("actions") or []:
                agent = act.get("softwareAgent")
                actions.append({"action": act.get("action"),
                                "digital_source_type": (str(act["digitalSourceType"]).rsplit("/", 1)[-1]
                                                        if act.get("digitalSourceType") else None),
                                "software_agent": agent.get("name") if isinstance(agent, dict) else agent})
    gen = m.get("claim_generator") or ", ".join(
        " ".join(str(x) for x in (g.get("name"), g.get("version")) if x) for g in m.get("claim_generator_info") or [])
    sig = m.get("signature_info") or {}
    failures = [s.get("code") for s in store.get("validation_status") or [] if s.get("code")]
    sources = [a["digital_source_type"] for a in actions if a["digital_source_type"]]
    return {
        "active_manifest": label, "claim_generator": gen or None, "title": m.get("title"),
        "signature": {"issuer": sig.get("issuer"), "common_name": sig.get("common_name"), "alg": sig.get("alg"),
                      "time": sig.get("time")},
        "actions": actions, "digital_source_type": sources[0] if sources else None,
        "validation_state": store.get("validation_state"), "validation_failures": failures,
        "n_manifests": len(store.get("manifests") or {}),
    }, []


def _mime(data: bytes, path: str) -> str:
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[4:8] == b"ftyp":
        return "image/avif" if b"avif" in data[8:32] else "image/heic"
    ext = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}.get(ext, "image/jpeg")


# --- together -----------------------------------------------------------------------------------------

def inspect_bytes(data: bytes, path: str = "", *, use_c2pa: bool = True) -> dict:
    """The provenance report of a file's bytes (see :func:`inspect_provenance`)."""
    problems: list[str] = []
    evidence: list[str] = []
    hints: list[str] = []
    checked = use_c2pa and c2pa_available()
    c2 = None
    if checked and (b"c2pa" in data or b"jumb" in data):  # every embedded manifest has a JUMBF 'c2pa' box
        c2, errs = read_c2pa(data, path)
        problems += errs
    if c2 is not None:
        state = c2["validation_state"] or "unknown"
        evidence.append(f"C2PA manifest by {c2['claim_generator'] or '?'} signed by "
                        f"{c2['signature']['issuer'] or '?'} (validation: {state}"
                        f"{'; ' + ', '.join(c2['validation_failures']) if c2['validation_failures'] else ''})")
        if c2["digital_source_type"] in AI_SOURCE_TYPES:
            hints.append(f"{_generator_in(c2['claim_generator'] or '') or c2['claim_generator'] or 'generator'} "
                         f"(C2PA digitalSourceType {c2['digital_source_type']})")
        elif _generator_in(c2["claim_generator"] or ""):
            hints.append(f"{_generator_in(c2['claim_generator'])} (C2PA claim generator)")
    dst = xmp_digital_source_type(data)
    if dst is None and c2 is not None:
        dst = c2["digital_source_type"]
    if dst is not None:
        evidence.append(f"IPTC DigitalSourceType {dst}")
        if dst in AI_SOURCE_TYPES:
            hints.append(f"generative AI (IPTC DigitalSourceType {dst})")
    texts: dict[str, str] = {}
    if data.startswith(PNG_SIGNATURE):
        texts, errs = png_text_chunks(data)
        problems += errs
        for key in texts:
            hint = _PNG_HINTS.get(key.lower())
            if hint and texts[key].strip():
                hints.append(hint)
                evidence.append(f"PNG text chunk {key!r}")
        for key in ("Software", "Comment", "Description", "Source"):
            g = _generator_in(texts.get(key, ""))
            if g:
                hints.append(f"{g} (PNG {key} chunk)")
                evidence.append(f"PNG text chunk {key!r} names {g}")
    exif, errs = exif_fields(data)
    problems += errs
    for key in ("Software", "Make", "Model"):
        g = _generator_in(exif.get(key, ""))
        if g:
            hints.append(f"{g} (EXIF {key})")
            evidence.append(f"EXIF {key} {exif[key]!r}")
    return {
        "c2pa": c2, "c2pa_checked": checked,
        "iptc_digital_source_type": dst,
        "generator_hint": hints[0] if hints else None,
        "generator_hints": hints,
        "metadata_says_ai": bool(hints),
        "png_text": {k: _short(v) for k, v in texts.items()},
        "exif": exif,
        "evidence": evidence,
        "problems": problems,
    }


def inspect_provenance(path: str | os.PathLike, *, use_c2pa: bool = True, max_bytes: int = MAX_READ) -> dict:
    """What the file at ``path`` says about its origin::

        {"c2pa": {...} | None, "c2pa_checked", "iptc_digital_source_type", "generator_hint",
         "generator_hints", "metadata_says_ai", "png_text", "exif", "evidence", "problems"}

    ``generator_hint`` is the strongest hint (C2PA, then IPTC, then PNG chunks, then EXIF) or None.
    ``problems`` lists malformed metadata (it never raises for a file's content). None of this is
    a verdict: absent metadata proves nothing, and metadata can be forged or stripped."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return {"error": f"cannot read {path} ({e.strerror or e})"}
    out = inspect_bytes(data[:max_bytes], str(path), use_c2pa=use_c2pa)
    if len(data) > max_bytes:
        out["problems"].append(f"only the first {max_bytes} bytes were examined")
    return out
