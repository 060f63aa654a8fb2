"""The `difflab serve` page in headless Chromium, driven by Selenium as a person would use it:
choose a model, fill the form, see a refused value named, generate, and get the grid, which
must decode to the requested size. Uses Debian's chromium and /usr/bin/chromedriver (nothing is
downloaded at run time); without them the test skips, unless DIFFLAB_REQUIRE_BROWSER=1 (CI),
where it fails and says how to install them."""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab.denoiser import NetworkDenoiser
from difflab.nets import UNet
from difflab.pipelines import Pipeline, new_manifest
from difflab.schedules import Schedule
from difflab.serve import make_server

INSTALL = "install them with: sudo apt-get install -y chromium chromium-driver (Debian/Ubuntu)"
T = 100


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip (fail under DIFFLAB_REQUIRE_BROWSER=1)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        message = f"the browser test needs {', '.join(missing)}; {INSTALL}"
        if os.environ.get("DIFFLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DIFFLAB_REQUIRE_BROWSER=1 but {message}", pytrace=False)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture
def driver(tmp_path):
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-extensions", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture
def server(tmp_path):
    torch.manual_seed(0)
    net = UNet(in_channels=1, model_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[],
               norm_groups=4, num_classes=3).eval()  # fmt: skip
    schedule = Schedule.make("cosine", T=T)
    manifest = new_manifest(schedule=schedule.to_config(), prediction="eps", variance="fixed_small",
                            sample_shape=[1, 8, 8], thresholding="static", conditioning="class",
                            num_classes=3)  # fmt: skip
    pipe = Pipeline(NetworkDenoiser(net, schedule, "eps", sample_shape=(1, 8, 8)), manifest)
    folder = pipe.save_pretrained(tmp_path / "tiny-class")
    running = make_server([folder, "digits-ddpm"], "127.0.0.1", 0, device="cpu").start()
    yield running
    running.close()


FETCH_PNG = """
const done = arguments[arguments.length - 1];
fetch(arguments[0]).then((r) => r.arrayBuffer()).then((buffer) => {
  let text = "";
  for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
  done(btoa(text));
}).catch((e) => done("ERROR " + e));
"""


def test_the_page_generates_a_grid_of_the_requested_size(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(server.url)
    wait.until(lambda d: "choose one and press Generate" in d.find_element(By.ID, "status").text)
    Select(driver.find_element(By.ID, "model")).select_by_value("tiny-class")
    assert driver.find_element(By.ID, "label-field").is_displayed()
    assert not driver.find_element(By.ID, "prompt-field").is_displayed()

    def fill(field: str, value: str) -> None:
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)

    # one step beyond the model's limit: refused, and the page names the field
    fill("steps", str(T + 1))
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: "steps must be an integer in [1, 100]" in d.find_element(By.ID, "status").text)
    assert "bad" in driver.find_element(By.ID, "steps").get_attribute("class")

    Select(driver.find_element(By.ID, "label")).select_by_value("2")
    Select(driver.find_element(By.ID, "sampler")).select_by_value("dpmpp_2m")
    fill("steps", "2")
    fill("n", "5")
    fill("seed", "3")
    fill("guidance", "1.5")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    status = driver.find_element(By.ID, "status").text
    assert "5 samples from tiny-class, dpmpp_2m-2, seed 3" in status
    image = driver.find_element(By.ID, "image")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    cols, rows = math.ceil(math.sqrt(5)), 2
    size = (cols * (8 + 2) + 2, rows * (8 + 2) + 2)  # 3 x 2 cells of 8 px with 2 px of white around each
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == list(size)
    link = driver.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("download") == "difflab-tiny-class-seed3.png"
    encoded = driver.execute_async_script(FETCH_PNG, link.get_attribute("href"))
    assert not encoded.startswith("ERROR"), encoded
    png = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert png.format == "PNG" and png.size == size and png.mode == "L"
    # and the unconditional shipped model hides what it does not take
    Select(driver.find_element(By.ID, "model")).select_by_value("digits-ddpm")
    assert not driver.find_element(By.ID, "label-field").is_displayed()
    assert not driver.find_element(By.ID, "guidance-field").is_displayed()
