"""The web console at /ui, driven in a real headless browser (Debian's chromium + chromium-driver via selenium):
sign in as the admin and create a user, sign in as that user, paste history items, personalize and watch the
job, ask a question and see the anchor's and the personalized answer side by side, then delete the user as the
admin. The token never appears in a URL, a cookie or browser storage. Each page is screenshotted (into
``$PRISP_SCREENSHOTS`` when set: that is how ``docs/console/`` was made)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from prisp.adapters import LoraSpec, random_init, save_adapter
from prisp.models import load_model
from prisp.personalize import PersonalizeConfig
from prisp.serve.auth import hash_token, issue_token
from prisp.serve.config import ServeConfig
from prisp.serve.embedded import serve_in_thread
from prisp.serve.keys import generate_key

pytestmark = pytest.mark.browser

ADMIN = issue_token().token
ITEMS = [{"id": str(i), "date": f"2025-01-{i + 1:02d}", "text": f"The council met on day {i} and approved the budget.",
          "title": f"Council approves budget, day {i}"} for i in range(4)]
QUESTION = "Generate a headline for the following article: The mayor opened a new park on Sunday."


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    tiny = load_model(str(tiny_model_dir))
    anchor = random_init(tiny.model, LoraSpec(), seed=1)
    generator = torch.Generator().manual_seed(1)
    for pair in anchor.pairs.values():
        pair.B.normal_(0, 0.05, generator=generator)
    root = tmp_path_factory.mktemp("console")
    config = ServeConfig(store=root / "store", model=str(tiny_model_dir), admin_token_hash=hash_token(ADMIN),
                         anchors={"LaMP-4": save_adapter(anchor, root / "anchor", "tiny")},
                         personalize=PersonalizeConfig(lr=1e-2, progress=False))
    with serve_in_thread(config, generate_key(), tiny, start_timeout=60) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def shot(browser, tmp_path, name: str) -> None:
    folder = Path(os.environ.get("PRISP_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(folder / f"{name}.png"))


def wait_text(browser, element_id: str, needle: str, timeout: float = 60) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda d: needle in d.find_element("id", element_id).text)
    return browser.find_element("id", element_id).text


def submit_token(browser, token: str) -> None:
    browser.find_element("id", "token").send_keys(token)
    browser.find_element("css selector", "#signin-form button").click()


def sign_in(browser, token: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    submit_token(browser, token)
    WebDriverWait(browser, 30).until(lambda d: not d.find_element("id", "signin").is_displayed())


def sign_out(browser) -> None:
    browser.find_element("id", "signout").click()


def test_the_console_end_to_end(live, browser, tmp_path):
    browser.get(f"{live.url}/ui")
    assert browser.title == "prisp console"
    shot(browser, tmp_path, "1-sign-in")

    submit_token(browser, "prisp_not_a_real_token_" + "x" * 20)  # a wrong token: one line, still signed out
    assert "invalid bearer token" in wait_text(browser, "error", "invalid")
    assert browser.find_element("id", "signin").is_displayed()
    sign_in(browser, ADMIN)
    assert browser.find_element("id", "admin").is_displayed() and browser.find_element("id", "who").text == "admin"
    browser.find_element("id", "create-user").click()
    created = wait_text(browser, "created", "shown once")
    user_id, token = created.split()[1].rstrip(";"), created.split()[-1]
    assert token.startswith("prisp_") and user_id.startswith("u_")
    wait_text(browser, "users", user_id)
    shot(browser, tmp_path, "2-admin")
    sign_out(browser)

    sign_in(browser, token)
    assert browser.find_element("id", "user").is_displayed() and browser.find_element("id", "who").text == user_id
    browser.execute_script("document.getElementById('items').value = arguments[0]", json.dumps(ITEMS, indent=1))
    browser.find_element("id", "personalize").click()
    assert "adapter version 1" in wait_text(browser, "job", "succeeded")
    browser.find_element("id", "question").send_keys(QUESTION)
    browser.find_element("id", "ask").click()
    wait_text(browser, "answer-version", "adapter v1")
    shown = (browser.find_element("id", "answer-anchor").text, browser.find_element("id", "answer-personal").text)
    expected = (live.service.generate(user_id, token, "LaMP-4", QUESTION, personal=False)[0],
                live.service.generate(user_id, token, "LaMP-4", QUESTION)[0])
    assert shown == tuple(text.strip() for text in expected)  # the same API answers, side by side
    shot(browser, tmp_path, "3-user")
    # Nothing of the token outside the page's memory.
    assert token not in browser.current_url and ADMIN not in browser.current_url
    assert browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    sign_out(browser)

    sign_in(browser, ADMIN)
    wait_text(browser, "users", user_id)
    browser.find_element("css selector", f"tr[data-user='{user_id}'] button.delete").click()
    browser.switch_to.alert.accept()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: user_id not in d.find_element("id", "users").text)
    assert not live.service.store.user_exists(user_id)


def test_console_assets_are_served_from_the_package_only(live):
    with live.client() as client:
        page = client.get("/ui")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text  # no CDN
        assert client.get("/ui/static/console.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/static/../app.py").status_code == 404
        assert client.get("/ui/static/index.html").status_code == 404
