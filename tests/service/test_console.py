"""``/console`` in a real browser (Debian's chromium through chromium-driver, driven by
selenium): sign in, preview a fact, apply it, see it applied, revert it, read the audit trail;
and nothing a user typed runs as markup.

``EDITSERVE_SCREENSHOTS=DIR`` keeps a screenshot of each step there (``docs/console-*.png``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait
from svc_helpers import live_server, server_settings

from editing.models import LoadedModel

EDITOR = "console-editor-key"
KEYS = {EDITOR: {"name": "console-user", "role": "editor"}}
SHOTS = os.environ.get("EDITSERVE_SCREENSHOTS")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1400")
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(
        options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    )
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _shot(driver: WebDriver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"console-{name}.png"))


def test_sign_in_preview_apply_revert_and_read_the_trail(
    browser: WebDriver,
    lm: LoadedModel,
    c0: dict,
    server_cache: Path,
    covariance_tokens: int,
    tmp_path: Path,
) -> None:
    settings = server_settings(
        server_cache, covariance_tokens, tmp_path / "data", api_keys=KEYS, v_steps=2
    )
    wait = WebDriverWait(browser, 120)
    with live_server(settings, lm, c0) as live:
        browser.get(f"{live.url}/console")
        browser.find_element(By.ID, "key").send_keys("not-a-key")
        browser.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "sign-in-error"), "unknown API key"))
        key = browser.find_element(By.ID, "key")
        key.clear()
        key.send_keys(EDITOR)
        browser.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        wait.until(ready.visibility_of_element_located((By.ID, "console")))
        wait.until(ready.text_to_be_present_in_element((By.ID, "health-list"), "smollm2"))
        _shot(browser, "signed-in")

        # A subject that is also markup: it must show as text, never run.
        subject = "<img src=x onerror=\"document.title='pwned'\">Eiffel Tower"
        browser.find_element(By.ID, "f-subject").send_keys(subject)
        browser.find_element(By.ID, "f-prompt").send_keys(
            f"The {subject} is located in the city of"
        )
        browser.find_element(By.ID, "f-target").send_keys("Rome")
        browser.find_element(By.ID, "f-reason").send_keys("console test")
        browser.find_element(By.ID, "preview-button").click()
        wait.until(ready.visibility_of_element_located((By.ID, "preview")))
        assert "Guardrails: pass" in browser.find_element(By.ID, "preview-verdict").text
        assert "P(Rome)" in browser.find_element(By.ID, "preview-table").text
        _shot(browser, "preview")

        browser.find_element(By.ID, "commit-button").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "detail-list"), "applied"))
        detail = browser.find_element(By.ID, "detail-list").text
        assert "console-user" in detail and "console test" in detail and subject in detail
        rows = browser.find_elements(By.CSS_SELECTOR, "#edits-table tbody tr")
        assert rows and "applied" in rows[0].text and subject in rows[0].text
        assert browser.title == "editserve console"  # the markup did not run
        assert not browser.find_elements(By.CSS_SELECTOR, "#edits-table img, #detail img")
        _shot(browser, "applied")

        browser.find_element(By.ID, "revert-reason").send_keys("only a test")
        browser.find_element(By.ID, "revert-button").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "detail-list"), "reverted"))
        history = browser.find_element(By.ID, "detail-history").text
        assert "apply by console-user: console test" in history
        assert "revert by console-user: only a test" in history
        wait.until(ready.text_to_be_present_in_element((By.ID, "audit-table"), "revert"))
        trail = browser.find_element(By.ID, "audit-table").text.splitlines()
        assert "revert console-user" in trail[1] and "only a test" in trail[1]
        _shot(browser, "reverted")
