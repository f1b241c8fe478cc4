"""End to end in a real browser: ``fakescope serve`` as its own process on a free loopback port,
the web page in headless Chromium (driven by Selenium), a real image uploaded through the file
input, the P(ai) the page shows compared with the API's answer, and screenshots kept as artifacts
(in pytest's tmp dir and in ``$FAKESCOPE_ARTIFACTS``, default ``tests/artifacts/``)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fakescope.cli import main

from synth import make_dataset, synthetic_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("FAKESCOPE_ARTIFACTS") or Path(__file__).parent / "artifacts")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium here: install Debian's chromium and chromium-driver (`make test` does so as root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("data") / "root", n_train=24, n_val=8)
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", "--model", "cnn32", "--data", str(data), "--epochs", "10", "--patience", "0",
                 "--lr", "3e-3", "--out", str(runs / "cnn32")]) == 0
    shutil.copytree(runs / "cnn32", runs / "cnn32-copy")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "fakescope", "serve", str(runs / "cnn32"), str(runs / "cnn32-copy"),
                             "--port", str(port), "--max-wait-ms", "2", "--no-access-log"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=runs)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            pass
        if proc.poll() is not None or httpx.get(f"{url}/ready").status_code != 200:
            log.seek(0)
            pytest.fail(f"fakescope serve did not become ready:\n{log.read()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fakescope-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1100,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _save(driver, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return shot


def test_upload_through_the_page_shows_the_api_p_ai(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    rng = np.random.default_rng(11)
    ai = tmp_path / "grid-pattern.png"
    Image.fromarray(synthetic_image(1, rng, 32, strength=0.3)).save(ai)
    photo = tmp_path / "smooth-photo.jpg"
    Image.fromarray(synthetic_image(0, rng, 256)).save(photo, quality=92)
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file with an image name\n")

    browser.get(server + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "threshold"))
    select = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in select.options] == ["cnn32", "cnn32-copy"]
    assert browser.find_element(By.ID, "model-field").is_displayed()  # two models: the selector shows
    assert not browser.find_element(By.ID, "key-field").is_displayed()  # no API key on this server
    select.select_by_value("cnn32-copy")

    upload = browser.find_element(By.CSS_SELECTOR, "input[type=file]")
    upload.send_keys("\n".join(str(p) for p in (ai, photo, bad)))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .p-ai")) == 2
               and d.find_elements(By.CSS_SELECTOR, "#results .err"))
    shown = {li.get_attribute("data-filename"): li for li in browser.find_elements(By.CSS_SELECTOR, "#results li")}
    assert set(shown) == {ai.name, photo.name, bad.name}

    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in (ai, photo)]
    api = httpx.post(f"{server}/v1/predict?model=cnn32-copy", files=files).json()
    for row in api["results"]:
        value = shown[row["filename"]].find_element(By.CSS_SELECTOR, ".p-ai")
        assert float(value.get_attribute("data-p-ai")) == row["p_ai"]
        assert value.text == f"{row['p_ai']:.4f}"
        verdict = shown[row["filename"]].find_element(By.CSS_SELECTOR, ".verdict").text
        assert verdict == ("AI-generated" if row["verdict"] == "ai" else "Real (nature)")
        meta = shown[row["filename"]].find_element(By.CSS_SELECTOR, ".meta").text
        assert "model cnn32-copy" in meta and "threshold 0.50" in meta
    error = shown[bad.name].find_element(By.CSS_SELECTOR, ".err").text
    assert error.startswith("Rejected:") and "text file" in error
    assert shown[bad.name].find_element(By.CSS_SELECTOR, ".thumb").text == "no preview"
    thumb = shown[photo.name].find_element(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].naturalWidth", thumb) == 256  # the thumbnail loaded
    assert "Scored 2 of 3" in browser.find_element(By.ID, "status").text

    shot = _save(browser, tmp_path, "serve-page.png")
    assert shot.stat().st_size > 10_000
    browser.set_window_size(390, 844)  # a phone
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
    _save(browser, tmp_path, "serve-page-phone.png")
    browser.set_window_size(1100, 900)


def test_docs_render_offline(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/docs")
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 4)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "/v1/predict" in text and "/v1/models" in text
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server) for r in resources), resources
