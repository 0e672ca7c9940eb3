import subprocess
import sys


def test_handlers_import_no_broker_runtime():
    code = (
        "import sys\n"
        "import services.dataprep.handler, services.trainer.handler\n"
        "import services.evaluator.handler, services.publisher.handler\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kombu', 'amqp')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
