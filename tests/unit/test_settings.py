from kubetune_operator.settings import Settings


def test_settings_from_env():
    s = Settings.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "x/y:1",
            "KUBETUNE_SPOT_VALUE": "SPOT",
            "KUBETUNE_SPOT_TOLERATIONS": '[{"key": "k", "operator": "Exists"}]',
            "KUBETUNE_PROGRESS_POLL_SECONDS": "2.5",
            "KUBETUNE_PREFLIGHT_S3_ENDPOINT": "false",
        }
    )
    assert (
        s.trainer_image == "x/y:1"
        and s.spot_value == "SPOT"
        and s.spot_tolerations == [{"key": "k", "operator": "Exists"}]
    )
    assert s.progress_poll_seconds == 2.5 and s.preflight_s3_endpoint is False
    assert Settings.from_env({}).gpu_prices["default"]["spot"] == 0.8
