"""explore in a real browser: headless Chromium (Debian's chromium and chromium-driver) opens
the page against a tiny model, moves a slider and sees the cell redrawn, with no errors in
the browser's console.

Without /usr/bin/chromium and /usr/bin/chromedriver the tests are skipped, except under
`make test` (CP2IMAGE_REQUIRE_BROWSER=1), which installs them, and in CI (CI=true): there their
absence is a failure.
"""
import base64
import io
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qsl
from urllib.request import urlopen

import numpy as np
import pytest
from PIL import Image

from cp2image_tf import explore
from cp2image_tf.serving.local import load_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
AREA = "Nuclei_AreaShape_Area"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1400,1000")


def _need_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        message = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("CI", "CP2IMAGE_REQUIRE_BROWSER")):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def model(disc_run):
    _need_browser()
    return load_model(disc_run)


@pytest.fixture(scope="module")
def url(model, disc_dataset):
    with explore.BackgroundServer(explore.create_app(model, disc_dataset)) as address:
        yield address


@pytest.fixture(scope="module")
def browser(model, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, address, hash_=""):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")  # a new document, not a hash change of the last one
    driver.get(f"{address}/{hash_}")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.body.classList.contains('ready')"))
    idle(driver)


def idle(driver, extra=None):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.body.dataset.activity === '0'") and (extra is None or extra(d)))


def composite_src(driver) -> str:
    return driver.execute_script("return document.getElementById('composite').src")


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    return np.asarray(image.convert("RGB")).astype(int)


def hash_params(driver) -> dict:
    return dict(parse_qsl(driver.execute_script("return location.hash").lstrip("#")))


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def drag(driver, slider, dx: int):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).click_and_hold(slider).move_by_offset(dx, 0).release().perform()


def test_moving_a_slider_redraws_the_cell(browser, url, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(browser, url, "#base=small")
    before = composite_src(browser)
    assert hash_params(browser) == {"base": "small"}
    slider = browser.find_element(By.CSS_SELECTOR, f'.row[data-name="{AREA}"] input[type=range]')
    drag(browser, slider, 70)
    idle(browser, lambda d: composite_src(d) != before and AREA in hash_params(d))

    params = hash_params(browser)
    assert set(params) == {"base", AREA} and params["base"] == "small"
    offset = float(params[AREA])
    assert 0.5 < offset <= explore.OFFSET_LIMIT
    assert browser.find_element(By.ID, "changed-count").text == "1"
    after = composite_src(browser)
    assert np.abs(decode(after) - decode(before)).max() > 0
    # What the page shows is the model's generate_png picture for the profile in the URL
    # (composited in the browser from 8-bit channels: within one grey level).
    query = browser.execute_script("return location.hash").lstrip("#")
    with urlopen(f"{url}/api/image.png?{query}") as answer:
        served = np.asarray(Image.open(io.BytesIO(answer.read())).convert("RGB")).astype(int)
    assert np.abs(decode(after) - served).max() <= 1
    shot = tmp_path / "explore.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("EXPLORE_SHOTS"):  # keep a copy to look at
        shutil.copy(shot, Path(os.environ["EXPLORE_SHOTS"]) / "browser_test.png")
    # The nearest real cells are shown, and undo brings the first cell back.
    assert len(browser.find_elements(By.CSS_SELECTOR, "#nn-list img")) == 6
    browser.find_element(By.ID, "undo").click()
    idle(browser, lambda d: hash_params(d) == {"base": "small"})
    assert np.array_equal(decode(composite_src(browser)), decode(before))
    assert console_errors(browser) == []


def test_a_bad_link_is_explained_on_the_page(browser, url):
    from selenium.webdriver.common.by import By

    open_page(browser, url, f"#base=999-1&Nope_Feature=1&{AREA}=40")
    notes = browser.find_element(By.ID, "notes").text
    assert "Nope_Feature" in notes and "999-1" in notes
    # +40 SD: beyond the sliders' ±5 SD and the training cells' areas; drawn at the largest.
    assert f"{AREA}: +40 SD from the base is beyond the values of the training cells" in notes
    params = hash_params(browser)
    assert set(params) == {"base", AREA} and params["base"] == "median"
    assert 0 < float(params[AREA]) < explore.OFFSET_LIMIT
    row = browser.find_element(By.CSS_SELECTOR, f'.row[data-name="{AREA}"]')
    assert "(max seen)" in row.text
    assert composite_src(browser).startswith("data:image/png")
    assert console_errors(browser) == []


def test_a_server_that_stops_answering_is_a_message_not_a_crash(browser, model):
    from selenium.webdriver.common.by import By

    server = explore.BackgroundServer(explore.create_app(model))
    with server as address:
        open_page(browser, address)
        before = composite_src(browser)
    # stopped: the page stays, says so, and keeps the profile
    slider = browser.find_element(By.CSS_SELECTOR, f'.row[data-name="{AREA}"] input[type=range]')
    drag(browser, slider, -60)
    idle(browser, lambda d: d.find_element(By.ID, "connection").is_displayed())
    assert "is not answering" in browser.find_element(By.ID, "connection").text
    assert AREA in hash_params(browser) and composite_src(browser) == before
    # The browser reports the refused connections; nothing else (no script errors).
    errors = console_errors(browser)
    assert errors and all("net::ERR_CONNECTION_REFUSED" in e["message"] for e in errors), errors
