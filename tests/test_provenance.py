import datetime
import io
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from fakescope.provenance import c2pa_available, inspect_bytes, inspect_provenance, png_text_chunks

XMP = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
       b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
       b'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" Iptc4xmpExt:DigitalSourceType='
       b'"http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"/></rdf:RDF></x:xmpmeta>'
       b'<?xpacket end="w"?>')


def _png(**texts) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(b, "PNG", pnginfo=info)
    return b.getvalue()


def _jpeg(**kw) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(b, "JPEG", **kw)
    return b.getvalue()


def test_png_parameters_chunk_is_stable_diffusion(tmp_path):
    f = tmp_path / "sd.png"
    f.write_bytes(_png(parameters="a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Model: v1-5"))
    r = inspect_provenance(f)
    assert r["generator_hint"] == "stable-diffusion (PNG parameters chunk)"
    assert r["metadata_says_ai"] and r["png_text"]["parameters"].startswith("a cat")
    assert r["c2pa"] is None and r["problems"] == []


def test_comfyui_chunks_and_compressed_text():
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}', zip=True)
    info.add_itxt("workflow", '{"nodes": []}', zip=True)
    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, "PNG", pnginfo=info)
    texts, problems = png_text_chunks(b.getvalue())
    assert texts == {"prompt": '{"3": {"class_type": "KSampler"}}', "workflow": '{"nodes": []}'} and not problems
    r = inspect_bytes(b.getvalue())
    assert r["generator_hints"] == ["comfyui (PNG prompt chunk)", "comfyui (PNG workflow chunk)"]


def test_jpeg_exif_software_names_the_generator():
    ex = Image.Exif()
    ex[0x0131] = "Adobe Firefly 3"
    r = inspect_bytes(_jpeg(exif=ex))
    assert r["exif"]["Software"] == "Adobe Firefly 3" and r["generator_hint"] == "firefly (EXIF Software)"
    ex[0x0131] = "GIMP 2.10"  # an editor is not a generator
    r = inspect_bytes(_jpeg(exif=ex))
    assert r["exif"]["Software"] == "GIMP 2.10" and r["generator_hint"] is None and not r["metadata_says_ai"]


def test_xmp_with_the_iptc_term():
    r = inspect_bytes(_jpeg(xmp=XMP))
    assert r["iptc_digital_source_type"] == "trainedAlgorithmicMedia"
    assert r["generator_hint"] == "generative AI (IPTC DigitalSourceType trainedAlgorithmicMedia)"
    camera = XMP.replace(b"trainedAlgorithmicMedia", b"digitalCapture")
    r = inspect_bytes(_jpeg(xmp=camera))
    assert r["iptc_digital_source_type"] == "digitalCapture" and r["generator_hint"] is None


def test_file_without_metadata():
    for data in (_png(), _jpeg()):
        r = inspect_bytes(data)
        assert r["generator_hint"] is None and r["c2pa"] is None and r["iptc_digital_source_type"] is None
        assert r["png_text"] == {} and r["exif"] == {} and r["problems"] == [] and r["evidence"] == []


def test_malformed_chunks_are_reported_and_the_rest_is_kept():
    data = _png(parameters="Steps: 20", Comment="made with ComfyUI")
    i = data.find(b"tEXt")
    (n,) = struct.unpack(">I", data[i - 4:i])
    bad = bytearray(data)
    bad[i + 4 + n] ^= 0xFF  # break the first chunk's checksum
    body = b"prompt\x00\x00not zlib"
    ztxt = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    bad = bytes(bad[:i - 4]) + ztxt + bytes(bad[i - 4:])
    r = inspect_bytes(bad)
    assert any("tEXt" in p and "checksum mismatch" in p for p in r["problems"])
    assert any("zTXt" in p and ("truncated" in p or "Error" in p or "incorrect" in p) for p in r["problems"])
    assert r["png_text"]["parameters"] == "Steps: 20"  # still reported, with the problem beside it
    assert "comfyui (PNG Comment chunk)" in r["generator_hints"]
    truncated = inspect_bytes(data[: i + 10])
    assert any("truncated" in p for p in truncated["problems"])
    assert "error" in inspect_provenance("/nonexistent/file.png")


def _signed_jpeg(source_type: str) -> bytes:
    """A JPEG with a C2PA manifest signed offline by a throw-away certificate chain made here."""
    c2pa = pytest.importorskip("c2pa")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fakescope test")])

    def usage(**on):
        keys = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{k: on.get(k, False) for k in keys})

    def cert(subject, issuer, pub, signing_key, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        else:
            b = (b.add_extension(usage(digital_signature=True), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                                critical=False)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
        return b.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("test root"), name("test root"), ca_key.public_key(), ca_key, True)
    leaf = cert(name("test signer"), ca.subject, key.public_key(), ca_key, False)
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=b"es256", sign_cert=chain, private_key=pem, ta_url=None))
    manifest = {"claim_generator_info": [{"name": "TestGen Image Creator", "version": "1"}], "title": "t.jpg",
                "format": "image/jpeg", "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "softwareAgent": {"name": "TestGen"},
                     "digitalSourceType": f"http://cv.iptc.org/newscodes/digitalsourcetype/{source_type}"}]}}]}
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/jpeg", io.BytesIO(_jpeg()), out)
    return out.getvalue()


@pytest.mark.skipif(not c2pa_available(), reason="c2pa-python is not installed (pip install 'fakescope[provenance]')")
def test_c2pa_manifest_signed_offline():
    data = _signed_jpeg("trainedAlgorithmicMedia")
    r = inspect_bytes(data, "x.jpg")
    c = r["c2pa"]
    assert c is not None and r["c2pa_checked"]
    assert c["claim_generator"].startswith("TestGen Image Creator") and c["signature"]["issuer"] == "fakescope test"
    assert c["digital_source_type"] == "trainedAlgorithmicMedia" and c["actions"][0]["action"] == "c2pa.created"
    # signed by our own throw-away CA: the signature validates, the signer is not on any trust list
    assert "signingCredential.untrusted" in c["validation_failures"]
    assert r["iptc_digital_source_type"] == "trainedAlgorithmicMedia"
    assert r["generator_hint"] == "image creator (C2PA digitalSourceType trainedAlgorithmicMedia)"
    # tamper with the pixels after signing: the hard binding no longer matches
    tampered = bytearray(data)
    tampered[-40] ^= 0xFF
    t = inspect_bytes(bytes(tampered), "x.jpg")["c2pa"]
    assert t is not None and any("mismatch" in f for f in t["validation_failures"]), t["validation_failures"]
    assert inspect_bytes(data, use_c2pa=False)["c2pa"] is None
