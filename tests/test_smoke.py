from tests.factories import FG_V1, create_feature_group


def test_create_then_get(client):
    created = create_feature_group(client)
    assert created["token"] == "****"
    got = client.get("/featureGroup/cell_kpis").get_json()
    assert got["featuregroup"] == created
    assert client.get(FG_V1).get_json()["featuregroups"] == [created]
