"""The web page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium):
submit a job from the form, watch it finish, read its page, ask the model a question."""

from __future__ import annotations

import json
import shutil
import time

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
        answer = _ask(browser, "What is Asthma?")
        browser.save_screenshot(str(tmp_path / "playground.png"))
        expected = client.invoke("web-job", "What is Asthma?")["generation"]
        assert answer == expected.strip() and answer  # greedy: the same words as the API's


def _ask(browser, question: str) -> str:
    """Ask the playground's selected model ``question``; the answer shown once it came."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prompt = browser.find_element(By.ID, "prompt-input")
    prompt.clear()
    prompt.send_keys(question)
    browser.find_element(By.ID, "ask-button").click()
    WebDriverWait(browser, 60).until(lambda b: "tokens" in b.find_element(By.ID, "ask-meta").text)
    return browser.find_element(By.ID, "answer").text


def _job_in_store(launcher, tiny_model, name, *extra_events):
    """A job written straight into the store (no worker is told): ``queued`` until an event
    says otherwise, e.g. ``paused`` after a stage run in-process."""
    from shared.jobs import new_job_id
    from shared.messages import JobSubmitted
    from tests.factories import launcher_jobs, make_spec

    jobs = launcher_jobs(launcher)
    job_id = new_job_id(name)
    uri = jobs.create(job_id, make_spec(tiny_model, name=name))
    jobs.record(JobSubmitted(job_id=job_id, spec_uri=uri, name=name))
    for make in extra_events:
        jobs.record(make(job_id))
    return job_id


def test_opening_another_job_shows_only_that_jobs_data(tmp_path, tiny_model, browser):
    """Issue 17: after a finished job, a failed, queued or paused job showed the finished
    one's progress, evaluation table, samples, chart and "quality gate: passed"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from services.cli.display import dataset_lines, follow
    from shared.messages import JobPaused

    find = browser.find_element

    def texts(css):  # read in one go: the page re-renders a job that is not over
        script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)"
        return browser.execute_script(script, css)

    def rows(table_id):
        return texts(f"#{table_id} tbody tr")

    def badges():
        return texts("#timeline .badge")

    def open_job(job_id, status):
        browser.execute_script("location.hash = arguments[0]", "#job/" + job_id)
        WebDriverWait(browser, 20).until(
            lambda b: (
                find(By.ID, "job-title").text == job_id
                and find(By.ID, "job-status").text == status
                and len(badges()) == 4
            )
        )

    def shows_nothing_of_the_finished_job():
        assert rows("eval-table") == [] and rows("samples") == []
        assert "quality gate" not in find(By.ID, "gate").text
        assert texts("#loss-chart *") == []
        assert "step" not in find(By.ID, "train-progress").text
        assert texts("#data li") == [] and "warning" not in find(By.ID, "data").text

    def shows_the_finished_jobs_data():  # data-prep's figures, worded as the CLI summary's
        prepared = client.job(done)["result"]["prepare"]
        counts = ", ".join(f"{k} {v} rows" for k, v in prepared["counts"].items())
        lines = [line.strip() for line in dataset_lines(prepared)]
        assert texts("#data li") == [f"dataset: {counts}", *lines]
        keeps = prepared["tokens"]["target"]["max_length"]
        assert any(
            line.startswith("target tokens") and f"keeps {keeps} (" in line for line in lines
        )
        warnings = texts("#data ul.warnings li")
        assert warnings == [f"warning: {w}" for w in prepared["warnings"]]
        assert ("no warnings" in find(By.ID, "data").text) is not bool(warnings)

    def shows_the_finished_job():
        WebDriverWait(browser, 20).until(
            lambda b: (
                len(rows("eval-table")) >= 1 and "quality gate: passed" in find(By.ID, "gate").text
            )
        )
        assert len(rows("samples")) >= 1
        assert len(texts("#loss-chart polyline.train")) == 1
        assert "step 6 / 6" in find(By.ID, "train-progress").text
        shows_the_finished_jobs_data()

    with _running(tmp_path) as (launcher, client):
        done = client.submit(spec_dict(tiny_model, name="web-done"))["id"]
        missing = str(tmp_path / "no-such-file.jsonl")
        failed = client.submit(spec_dict(tiny_model, name="web-bad", dataset={"source": missing}))
        failed = failed["id"]
        assert follow(client, failed, timeout=120, poll=0.5)["status"] == "failed"
        assert follow(client, done, timeout=400, poll=0.5)["status"] == "succeeded"
        queued = _job_in_store(launcher, tiny_model, "web-queued")
        nxt = "termtune train SPEC --job {}"
        paused = _job_in_store(
            launcher,
            tiny_model,
            "web-paused",
            lambda i: JobPaused(job_id=i, stage="prepare", next=nxt.format(i)),
        )

        browser.get(launcher.url + "/ui")
        key = (launcher.run_dir / "api_key").read_text().strip()
        find(By.ID, "api-key").send_keys(key, Keys.TAB)

        open_job(done, "succeeded")
        shows_the_finished_job()

        open_job(failed, "failed")
        assert badges() == ["failed", "skipped", "skipped", "skipped"]
        assert "file not found" in find(By.ID, "job-error").text
        assert find(By.ID, "data").text == "data-prep failed"
        shows_nothing_of_the_finished_job()
        browser.save_screenshot(str(tmp_path / "failed-after-done.png"))

        open_job(queued, "queued")
        assert badges() == ["pending"] * 4
        assert find(By.ID, "job-error").text == ""
        assert find(By.ID, "train-progress").text == "waiting for training to start"
        shows_nothing_of_the_finished_job()

        open_job(done, "succeeded")
        shows_the_finished_job()
        open_job(paused, "paused")
        assert nxt.format(paused) in find(By.ID, "job-next").text
        shows_nothing_of_the_finished_job()
        browser.save_screenshot(str(tmp_path / "paused-after-done.png"))

        # A slow reply for the job left behind must not land on the next one's page: the
        # finished job's requests answer 1.5 s late, and the failed job opens before that.
        open_job(queued, "queued")
        browser.execute_script(
            """const slow = arguments[0], plain = window.fetch.bind(window);
            window.fetch = (url, options) => String(url).includes(slow)
              ? new Promise((ok) => setTimeout(ok, 1500)).then(() => plain(url, options))
              : plain(url, options);""",
            done,
        )
        browser.execute_script("location.hash = arguments[0]", "#job/" + done)
        open_job(failed, "failed")
        time.sleep(4)  # every slow reply has come back by now
        assert find(By.ID, "job-title").text == failed
        assert find(By.ID, "job-status").text == "failed"
        assert badges() == ["failed", "skipped", "skipped", "skipped"]
        shows_nothing_of_the_finished_job()

        browser.get(launcher.url + "/ui#jobs")
        WebDriverWait(browser, 20).until(lambda b: failed in find(By.ID, "jobs-table").text)
        row = texts(f"#jobs-table tr:has(a[href='#job/{failed}']) td")
        assert row[1:3] == ["failed", "prepare"]  # where it stopped, not "publish"

        # A tracked job links to its MLflow run; the next job's page does not keep the link,
        # and a link that is not http(s) is never shown.
        from shared.messages import ModelTrained

        url = "http://mlflow.example:5000/#/experiments/3/runs/abc123"

        def trained(link):
            ref = {"backend": "mlflow", "run_id": "abc123", "experiment_id": "3", "url": link}
            return lambda i: ModelTrained(
                job_id=i, manifest="file:///m.json", train_loss=1.0, steps=6, tracking=ref
            )

        tracked = _job_in_store(launcher, tiny_model, "web-tracked", trained(url))
        sneaky = _job_in_store(launcher, tiny_model, "web-sneaky", trained("javascript:alert(1)"))
        open_job(tracked, client.job(tracked)["status"])
        run_link = find(By.CSS_SELECTOR, "#job-run a")
        assert find(By.ID, "job-run").is_displayed()
        assert run_link.get_attribute("href") == url and run_link.text == "mlflow run abc123"
        open_job(queued, "queued")
        assert not find(By.ID, "job-run").is_displayed()
        open_job(sneaky, client.job(sneaky)["status"])
        assert not find(By.ID, "job-run").is_displayed()
        assert not run_link.get_attribute("href").startswith("javascript:")


def test_the_playground_asks_a_chat_model_with_a_chat_message(tmp_path, tiny_qwen, browser):
    """A model trained in its chat template is listed as a chat model and asked through
    chat completions: the page shows the API's chat answer and its usage."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    find = browser.find_element
    with _running(tmp_path) as (launcher, client):
        job_id = client.submit(spec_dict(tiny_qwen, name="chat-job"))["id"]
        deadline = time.monotonic() + 400
        while client.job(job_id)["status"] not in ("succeeded", "failed", "rejected"):
            assert time.monotonic() < deadline, client.job(job_id)
            time.sleep(1)
        assert client.job(job_id)["status"] == "succeeded", client.job(job_id)
        assert client.model("chat-job")["chat"] is True

        browser.get(launcher.url + "/ui")
        key = (launcher.run_dir / "api_key").read_text().strip()
        find(By.ID, "api-key").send_keys(key, Keys.TAB)
        find(By.CSS_SELECTOR, "a[data-view=playground]").click()
        WebDriverWait(browser, 10).until(
            lambda b: find(By.ID, "model-select").get_attribute("value") == "chat-job"
        )
        assert Select(find(By.ID, "model-select")).first_selected_option.text == (
            "chat-job (local, chat)"
        )
        answer = _ask(browser, "What is Asthma?")
        browser.save_screenshot(str(tmp_path / "playground-chat.png"))
        reply = client.invoke_body(
            "chat-job", {"messages": [{"role": "user", "content": "What is Asthma?"}]}
        )
        (choice,) = reply["choices"]
        assert answer == choice["message"]["content"].strip()
        assert find(By.ID, "ask-meta").text.startswith(
            f"{reply['usage']['completion_tokens']} tokens · {choice['finish_reason']} · "
        )
