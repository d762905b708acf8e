"""The chat playground at `/`, in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) driven by Selenium against a live server.

Screenshots are kept as test artifacts in `$SLMFLOW_TEST_ARTIFACTS` (default: test-artifacts/).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slmflow.server import ServerSettings
from tests.server.conftest import LONG, MADRID, LiveServer, serve, wait_until

ARTIFACTS = Path(os.environ.get("SLMFLOW_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    options.add_argument(
        f"--user-data-dir={Path(os.environ.get('TMPDIR', '/tmp')) / f'slmflow-chromium-{os.getpid()}'}"
    )
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_script_timeout(60)
    yield session
    session.quit()


@pytest.fixture(scope="module")
def playground(registered_model_uri: str) -> Iterator[LiveServer]:
    yield from serve(
        ServerSettings(model_uri=registered_model_uri, model_name="tiny", traces=False, metrics_interval=0)
    )


def answers(browser) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")


def send(browser, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)  # Enter sends


def test_a_message_streams_an_answer_with_its_figures(browser, playground: LiveServer) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(playground.url + "/")
    assert wait_until(lambda: "version 1" in browser.find_element(By.ID, "model").text, timeout=30)
    assert "tiny" in browser.find_element(By.ID, "model").text  # name and registry version
    browser.find_element(By.ID, "temperature").send_keys(Keys.HOME)  # 0: greedy
    box = browser.find_element(By.ID, "input")
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line")  # Shift+Enter: a new line
    assert box.get_attribute("value") == "first line\nsecond line" and not answers(browser)
    box.clear()
    send(browser, "What is the capital of Spain?")
    assert wait_until(lambda: answers(browser) and answers(browser)[-1].get_attribute("data-state") == "done", 60)
    answer = answers(browser)[-1]
    assert answer.find_element(By.CLASS_NAME, "content").text == MADRID
    figures = answer.find_element(By.CLASS_NAME, "stats").text
    assert "tokens" in figures and "first token" in figures and "tokens/s" in figures and "finish: stop" in figures
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


def test_stop_aborts_the_request_and_the_server_cancels_the_generation(browser, playground: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    browser.get(playground.url + "/")
    extra = browser.find_element(By.ID, "extra")
    extra.send_keys(f'{{"min_tokens": {LONG}}}')  # forced long: still generating when stopped
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys(str(LONG))
    cancelled = playground.metric("slmflow_finished_requests_total", reason="cancelled")
    ran_out = playground.metric("slmflow_finished_requests_total", reason="length")
    send(browser, "What is the capital of Spain?")
    assert wait_until(lambda: answers(browser) and answers(browser)[-1].find_element(By.CLASS_NAME, "content").text, 60)
    browser.find_element(By.ID, "stop").click()
    assert wait_until(lambda: answers(browser)[-1].get_attribute("data-state") == "stopped", 30)
    assert wait_until(
        lambda: playground.metric("slmflow_finished_requests_total", reason="cancelled") == cancelled + 1, 30
    )
    assert playground.metric("slmflow_finished_requests_total", reason="length") == ran_out
    assert "stopped" in answers(browser)[-1].find_element(By.CLASS_NAME, "stats").text
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()


def test_model_output_is_markdown_never_html(browser, playground: LiveServer) -> None:
    browser.get(playground.url + "/")
    rendered = browser.execute_script(
        "return renderMarkdown(arguments[0]);",
        '**bold** `code` <img src=x onerror="window.owned=1"> [site](https://example.org) [js](javascript:alert(1))\n'
        "```\n<script>window.owned=1</script>\n```",
    )
    assert "<strong>bold</strong>" in rendered and "<code>code</code>" in rendered
    assert '<a href="https://example.org"' in rendered
    assert "<img" not in rendered and "<script" not in rendered and "javascript:" not in rendered.split("[js]")[0]
    assert "&lt;img" in rendered and "&lt;script&gt;" in rendered
    assert 'href="javascript' not in rendered


def test_with_an_api_key_the_page_asks_for_it(browser, onnx_model_path: Path) -> None:
    from selenium.webdriver.common.by import By

    settings = ServerSettings(model_uri=str(onnx_model_path), api_key="s3cret", traces=False, metrics_interval=0)
    for live in serve(settings):
        assert httpx.get(f"{live.url}/", timeout=10).status_code == 200  # the page itself is open
        assert httpx.get(f"{live.url}/v1/models", timeout=10).status_code == 401  # what it shows is not
        browser.get(live.url + "/")
        assert wait_until(lambda: _alert(browser), 30), "the page did not ask for the key"
        alert = browser.switch_to.alert
        alert.send_keys("s3cret")
        alert.accept()
        assert wait_until(lambda: "tiny-chat" in browser.find_element(By.ID, "model").text, 30)
        send(browser, "What is the capital of Spain?")
        assert wait_until(lambda: answers(browser) and answers(browser)[-1].get_attribute("data-state") == "done", 60)
        assert answers(browser)[-1].find_element(By.CLASS_NAME, "content").text == MADRID
        browser.execute_script("sessionStorage.clear()")


def _alert(browser) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        browser.switch_to.alert  # noqa: B018 - raises unless an alert is open
        return True
    except NoAlertPresentException:
        return False


def test_the_playground_can_be_turned_off(onnx_model_path: Path) -> None:
    for live in serve(ServerSettings(model_uri=str(onnx_model_path), playground=False, traces=False)):
        assert httpx.get(f"{live.url}/", timeout=10).status_code == 404
        assert httpx.get(f"{live.url}/playground/playground.js", timeout=10).status_code == 404
