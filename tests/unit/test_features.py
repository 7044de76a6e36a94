"""The feature definition (odl.features): windows, the tile rule, last clicks, encoding."""
from odl import features as F
from odl.features import Features, ItemState, Tile, UserState, features_as_of, tile_at, tile_counts

MIN = 60_000
B = 1_800_000_000_000 // MIN * MIN      # a minute boundary


def test_tile_is_used_only_for_its_slide():
    t = Tile(B, 7, 2)
    assert tile_counts(t, B) == (7, 2)                  # ends exactly at the boundary
    assert tile_counts(t, B + 59_999) == (7, 2)
    assert tile_counts(t, B + MIN + 5) == (7, 2)        # next tile may still be in flight
    assert tile_counts(t, B + 2 * MIN) == (0, 0)        # the entity went quiet
    assert tile_counts(t, B - 1) == (0, 0)              # never a tile from the future
    assert tile_counts(None, B) == (0, 0)


def test_the_jobs_tile_history_gives_the_tile_before_on_a_tiles_last_millisecond():
    # the job's temporal join, as of B + MIN - 1, finds the version of the tile ending at
    # B + MIN (its version time is its last millisecond): the tile in force is the one before
    history = f"{Tile(B, 7, 2).encode()} {Tile(B + MIN, 9, 3).encode()}"
    assert tile_at(history, B + MIN - 1) == Tile(B, 7, 2)
    assert tile_at(history, B + MIN) == Tile(B + MIN, 9, 3)
    assert tile_at(Tile(B, 7, 2).encode(), B + 5) == Tile(B, 7, 2)   # the store's one tile
    assert tile_at(Tile(B, 7, 2).encode().encode(), B - 1) is None
    assert tile_at("junk 1|2", B) is None and tile_at(None, B) is None


def test_last_clicks_exclude_the_impressions_own_moment():
    clicks = f"{B - 5000}:11:1 {B - 1000}:12:2 {B}:13:3"
    f = features_as_of(UserState(last_clicks=clicks), ItemState(), B)
    assert f.user.last_items == (12, 11, 0, 0, 0)       # newest first; the click at B left out
    assert f.user.last_categories == (2, 1, 0, 0, 0)
    garbage = features_as_of(UserState(last_clicks="x:y 5:6 7:8:9"), ItemState(), B)
    assert garbage.user.last_items == (8, 0, 0, 0, 0)   # unreadable entries are skipped


def test_features_and_smoothed_ctr():
    f = features_as_of(UserState(Tile(B, 3, 1), Tile(B, 30, 4)), ItemState(Tile(B, 80, 8)), B + 10)
    assert (f.user.imps_5m, f.user.clicks_5m, f.user.imps_1h, f.user.clicks_1h) == (3, 1, 30, 4)
    assert f.item.ctr_1h == (8 + F.CTR_PRIOR * F.CTR_PRIOR_STRENGTH) / (80 + F.CTR_PRIOR_STRENGTH)
    assert Features().item.ctr_1h == F.CTR_PRIOR        # no events: the prior
    assert len(f.dense()) == F.NUM_DENSE


def test_encodings_round_trip():
    t = Tile(B, 5, 1)
    assert Tile.decode(t.encode()) == t and Tile.decode(t.encode().encode()) == t
    assert Tile.decode("nonsense") is None and Tile.decode(None) is None
    f = features_as_of(UserState(last_clicks=f"{B - 1}:4:2"), ItemState(Tile(B, 2, 1)), B)
    assert Features.from_json(f.to_json()) == f
    assert Features.from_json(None) == Features()
    assert F.category_of(1234) == 234 and F.category_of("x") == 0 and F.category_of(True) == 0


def test_dense_rows_split_into_a_user_part_and_an_item_part():
    """Serving computes each entity's part once (serving.features: user_dense_as_of,
    item_dense_as_of); that is only right if Features.dense of a pair is the user's part
    followed by the item's."""
    from odl.features import (ItemState, Tile, UserState, features_as_of, item_dense_as_of,
                              user_dense_as_of)
    t = 1_800_000_000_000
    users = {1: UserState(Tile(t - 60_000, 7, 2), Tile(t - 60_000, 30, 4), f"{t - 5}:9:3"),
             2: UserState()}
    items = {5: ItemState(Tile(t - 60_000, 50, 6)), 6: ItemState()}
    pairs = [(1, 5), (1, 6), (2, 5), (2, 6)]
    want = [features_as_of(users[u], items[i], t).dense() for u, i in pairs]
    assert [user_dense_as_of(users[u], t) + item_dense_as_of(items[i], t) for u, i in pairs] == want
    assert want[0] != want[3]
