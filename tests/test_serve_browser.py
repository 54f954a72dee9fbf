"""The chat page end to end in headless Chromium: key once, pick a model, type, see a streamed reply.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium; skips with
the reason when they are missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is needed for the browser test")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from serve_support import LiveServer, make_model_dir  # noqa: E402

from behemoth.serve.app import create_app  # noqa: E402
from behemoth.serve.keys import KeyStore, Limits, create_key  # noqa: E402
from behemoth.serve.models import load_served_model  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    model_dir = make_model_dir(root / "model")
    keys_file = root / "keys.json"
    key, _ = create_key(keys_file, "browser", Limits(requests_per_minute=None, tokens_per_minute=None))
    models = [load_served_model("tiny", model_dir, max_batch_size=2),
              load_served_model("tiny-b", model_dir, max_batch_size=2)]
    with LiveServer(create_app(models, KeyStore(keys_file))) as live:
        live.key = key
        yield live


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_chat_page_streams_a_reply(server, browser):
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    overlay = browser.find_element(By.ID, "key-overlay")
    assert overlay.is_displayed()                                 # asks for the key first
    browser.find_element(By.ID, "key-input").send_keys("bh-000000000000-wrongwrongwrongwrong")
    browser.find_element(By.ID, "key-submit").click()
    wait.until(lambda d: "Incorrect API key" in d.find_element(By.ID, "key-error").text)
    browser.find_element(By.ID, "key-input").send_keys(server.key)
    browser.find_element(By.ID, "key-submit").click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    assert not overlay.is_displayed()
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny-b")
    for field, value in (("temperature", "0"), ("max-tokens", "24")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)

    browser.find_element(By.ID, "input").send_keys("Hello there, who are you?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='true']")
               or d.find_elements(By.CSS_SELECTOR, ".message.error"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")
    reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    assert reply.text.strip()
    assert int(reply.get_attribute("data-chunks")) > 1           # it arrived in pieces: streamed
    assert browser.find_element(By.ID, "status").text.startswith("Done")
    user = browser.find_element(By.CSS_SELECTOR, ".message.user")
    assert user.text == "Hello there, who are you?"

    # A second turn carries the conversation; a reload keeps it and does not ask for the key again.
    browser.find_element(By.ID, "input").send_keys("And then?\n")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='true']")) == 2)
    assert browser.execute_script("return JSON.parse(sessionStorage.getItem('behemoth.conversation')).length") == 4
    browser.refresh()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    assert not browser.find_element(By.ID, "key-overlay").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 4
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == "tiny-b"
    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
