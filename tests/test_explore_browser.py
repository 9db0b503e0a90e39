"""explore in a real browser: headless Chromium (Debian's chromium and chromium-driver) opens
the page against a tiny model, moves a slider and sees the cell redrawn (its pixels, not only
an answered request), switches the slider to "this feature alone", and reads the moved
feature re-measured on the drawn cell, with no errors in the browser's console.

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
DNA = "Nuclei_Intensity_MeanIntensity_DNA"
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


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels whose colour differs by more than 2 grey levels in any channel."""
    return float((np.abs(a - b).max(axis=-1) > 2).mean())


def readout(driver, name: str) -> str:
    return driver.execute_script(
        "const el = document.querySelector(`.row[data-name='${arguments[0]}'] .remeasured`);"
        "return el && !el.hidden ? el.textContent : '';", name)


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
    # The picture itself changed: a visible share of its pixels, not a rounding step.
    assert changed_share(decode(after), decode(before)) > 0.02
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


def test_sliders_move_correlated_features_unless_alone(browser, url):
    from selenium.webdriver.common.by import By

    open_page(browser, url, f"#base=small&{AREA}=2")
    mode = browser.find_element(By.ID, "mode").text
    assert "with the features correlated with it" in mode
    assert not browser.find_element(By.ID, "alone").is_selected()
    assert DNA in browser.find_element(By.ID, "moved-with").text  # moved with it, and said
    assert "1 correlated feature with it" in browser.find_element(By.ID, "caption").text
    correlated = decode(composite_src(browser))
    with urlopen(f"{url}/api/render?base=small&{AREA}=2") as answer:
        assert b"moved_with" in answer.read()

    browser.find_element(By.ID, "alone").click()
    idle(browser, lambda d: hash_params(d).get("alone") == "1")
    assert hash_params(browser) == {"base": "small", "alone": "1", AREA: "2"}
    assert "moves its feature alone" in browser.find_element(By.ID, "mode").text
    assert not browser.find_element(By.ID, "moved-with").is_displayed()
    assert browser.find_element(By.ID, "caption").text.endswith("changed alone")
    alone = decode(composite_src(browser))
    # The DNA intensity no longer moves with the area: another picture.
    assert changed_share(alone, correlated) > 0.01
    # What the page shows is the API's picture of the same profile.
    with urlopen(f"{url}/api/image.png?base=small&alone=1&{AREA}=2") as answer:
        served = np.asarray(Image.open(io.BytesIO(answer.read())).convert("RGB")).astype(int)
    assert np.abs(alone - served).max() <= 1
    # Undo brings the correlated mode back, picture and all.
    browser.find_element(By.ID, "undo").click()
    idle(browser, lambda d: "alone" not in hash_params(d))
    assert not browser.find_element(By.ID, "alone").is_selected()
    assert np.abs(decode(composite_src(browser)) - correlated).max() <= 1
    assert console_errors(browser) == []


def test_the_moved_feature_is_re_measured_beside_its_slider(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, url, "#base=small")
    assert readout(browser, AREA) == ""  # nothing moved, nothing re-measured
    slider = browser.find_element(By.CSS_SELECTOR, f'.row[data-name="{AREA}"] input[type=range]')
    drag(browser, slider, 70)
    WebDriverWait(browser, 120).until(lambda d: readout(d, AREA).startswith("re-measured "))
    idle(browser)
    text = readout(browser, AREA)
    query = browser.execute_script("return location.hash").lstrip("#")
    with urlopen(f"{url}/api/remeasure?{query}") as answer:
        import json

        [reading] = json.loads(answer.read())["features"]
    assert reading["feature"] == AREA and reading["measured"] is not None
    # The value shown is the API's, in the feature's units (4 significant digits), beside the
    # asked one, with how much of the asked change the picture made.
    shown = browser.execute_script("return arguments[0].toPrecision(4)", reading["measured"])
    asked = browser.execute_script("return arguments[0].toPrecision(4)", reading["asked"])
    assert f"re-measured {float(shown):g}" in text and f"asked {float(asked):g}" in text
    assert "% of the change" in text
    changed = browser.find_element(By.CSS_SELECTOR, f'#changed-list .remeasured[data-name="{AREA}"]')
    assert changed.text == text
    assert console_errors(browser) == []


def test_without_data_the_page_says_what_the_readout_and_correlated_moves_need(browser, model):
    from selenium.webdriver.common.by import By

    with explore.BackgroundServer(explore.create_app(model)) as address:
        open_page(browser, address, f"#{AREA}=1")
        assert browser.find_element(By.ID, "alone").get_attribute("disabled") is not None
        assert "needs the dataset" in browser.find_element(By.ID, "mode").text
        note = browser.find_element(By.ID, "remeasure-note").text
        assert note.startswith("No re-measured values:") and "--data DATA_DIR" in note
        assert readout(browser, AREA) == ""
        assert console_errors(browser) == []
