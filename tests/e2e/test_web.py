"""The web page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium):
submit a job from the form, watch it finish, read its page, ask the model a question."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.e2e.test_trainer_shutdown import _running
from tests.factories import spec_dict

pytestmark = pytest.mark.e2e


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are needed: `make browsers` installs them")
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2200",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def test_submit_watch_and_ask_from_the_page(tmp_path, tiny_model, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    find = browser.find_element
    with _running(tmp_path) as (launcher, client):
        browser.get(launcher.url + "/")  # redirects to /ui
        assert browser.current_url.endswith("/ui")
        key = (launcher.run_dir / "api_key").read_text().strip()
        find(By.ID, "api-key").send_keys(key, Keys.TAB)
        find(By.CSS_SELECTOR, "a[data-view=submit]").click()
        spec = find(By.ID, "spec-input")
        spec.clear()
        spec.send_keys(json.dumps(spec_dict(tiny_model, name="web-job")))
        find(By.ID, "submit-button").click()
        WebDriverWait(browser, 20).until(lambda b: "#job/web-job-" in b.current_url)
        job_id = browser.current_url.split("#job/")[1]

        status = find(By.ID, "job-status")
        WebDriverWait(browser, 400, poll_frequency=1).until(
            lambda b: status.text in ("succeeded", "failed", "rejected", "cancelled")
        )
        browser.save_screenshot(str(tmp_path / "job.png"))
        assert status.text == "succeeded", client.job(job_id)
        stages = find(By.ID, "timeline").find_elements(By.CSS_SELECTOR, ".stage .badge")
        assert [s.text for s in stages] == ["succeeded"] * 4
        WebDriverWait(browser, 10).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#eval-table tr[data-metric=loss]"))
        )
        report = client.report(job_id)
        train_line = find(By.CSS_SELECTOR, "#loss-chart polyline.train")
        points = train_line.get_attribute("points").split()
        assert len(points) == len(report["curves"]["train_loss"]) >= 2  # every logged loss
        assert "step 6 / 6" in find(By.ID, "train-progress").text
        loss_row = find(By.CSS_SELECTOR, "#eval-table tr[data-metric=loss]").text.split()
        assert loss_row[1] == f"{report['metrics']['loss']['base']:.4f}"
        assert len(find(By.ID, "samples").find_elements(By.CSS_SELECTOR, "tbody tr")) >= 1

        find(By.CSS_SELECTOR, "a[data-view=jobs]").click()
        WebDriverWait(browser, 10).until(
            lambda b: (
                job_id in find(By.ID, "jobs-table").text
                and "succeeded" in find(By.ID, "jobs-table").text
            )
        )

        find(By.CSS_SELECTOR, "a[data-view=playground]").click()
        WebDriverWait(browser, 10).until(
            lambda b: find(By.ID, "model-select").get_attribute("value") == "web-job"
        )
        prompt = find(By.ID, "prompt-input")
        prompt.clear()
        prompt.send_keys("What is Asthma?")
        find(By.ID, "ask-button").click()
        WebDriverWait(browser, 60).until(lambda b: "tokens" in find(By.ID, "ask-meta").text)
        browser.save_screenshot(str(tmp_path / "playground.png"))
        answer = find(By.ID, "answer").text
        expected = client.invoke("web-job", "What is Asthma?")["generation"]
        assert answer == expected.strip() and answer  # greedy: the same words as the API's
