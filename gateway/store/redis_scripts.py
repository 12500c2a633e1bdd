"""The Lua scripts of the Redis store (gateway/store/redis.py): each write that changes what a
token may do runs as one script, so it and its change-feed entry land together; `FEED` reads
the change feed and tells a reader when it must forget its cache."""

# Every feed entry carries `n`, a counter incremented with it, so a reader can tell whether it
# saw every entry after its cursor: the next entry must be n + 1, else some were trimmed away.
APPEND = """
local function append(stream, seq, maxlen, jti)
  local n = redis.call('INCR', seq)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'jti', jti, 'n', n)
end
"""

# KEYS: record, tokens zset, changes stream, feed counter, children set of the parent (or ''),
# lineage set of the root (or '').  ARGV from `first`: jti, iat, feed maxlen, field, value, ...
# A record put again (a repeated migration) never comes back to life and never gets longer:
# an existing revocation, an earlier expiry and a later last use are kept.
WRITE = APPEND + """
local function write(first)
  local jti, iat, maxlen = ARGV[first], ARGV[first + 1], ARGV[first + 2]
  local old = redis.call('HMGET', KEYS[1], 'revoked_at', 'revoked_reason', 'exp', 'last_used_at')
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, first + 3))
  if old[1] then
    redis.call('HSET', KEYS[1], 'revoked_at', old[1])
    if old[2] then
      redis.call('HSET', KEYS[1], 'revoked_reason', old[2])
    else
      redis.call('HDEL', KEYS[1], 'revoked_reason')
    end
  end
  if old[3] and tonumber(old[3]) < tonumber(redis.call('HGET', KEYS[1], 'exp')) then
    redis.call('HSET', KEYS[1], 'exp', old[3])
  end
  if old[4] then
    local used = redis.call('HGET', KEYS[1], 'last_used_at')
    if not used or tonumber(used) < tonumber(old[4]) then
      redis.call('HSET', KEYS[1], 'last_used_at', old[4])
    end
  end
  redis.call('ZADD', KEYS[2], iat, jti)
  if KEYS[5] ~= '' then
    redis.call('SADD', KEYS[5], jti)
  end
  if KEYS[6] ~= '' then
    redis.call('SADD', KEYS[6], jti)
  end
  append(KEYS[3], KEYS[4], maxlen, jti)
end
"""

PUT = WRITE + """
write(1)
return 1
"""

PUT_DERIVED = WRITE + """
-- KEYS: as WRITE, then the parent's record.
-- ARGV: now, max live derived tokens of the lineage (-1: no cap), prefix, then WRITE's from 4.
-- The parent is checked and the record written in one script: a revocation (REVOKE, also one
-- script) runs wholly before, and this refuses, or wholly after, and its cascade takes the record.
local now, cap, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local parent = redis.call('HMGET', KEYS[7], 'revoked_at', 'exp')
if redis.call('EXISTS', KEYS[7]) == 0 then
  return 'missing'
end
if parent[1] then
  return 'revoked'
end
if tonumber(parent[2]) <= now then
  return 'expired'
end
local exp
for j = 7, #ARGV, 2 do
  if ARGV[j] == 'exp' then
    exp = tonumber(ARGV[j + 1])
  end
end
if exp > tonumber(parent[2]) then
  return 'outlives'
end
if cap >= 0 then
  -- Count the live tokens of the lineage, dropping the dead from its set as it goes.
  local live = 0
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[6])) do
    local state = redis.call('HMGET', prefix .. 'tok:' .. member, 'revoked_at', 'exp')
    if state[1] or not state[2] or tonumber(state[2]) <= now then
      redis.call('SREM', KEYS[6], member)
    else
      live = live + 1
    end
  end
  if live >= cap then
    return 'full'
  end
end
write(4)
return 'ok'
"""

# The token `root` and everything attenuated from it (children:{jti}, transitively, through what is
# already revoked), each visited once: visit(jti, its record's key).
WALK = """
local function walk(prefix, root, visit)
  local queue, seen = {root}, {}
  local i = 1
  while i <= #queue do
    local jti = queue[i]
    i = i + 1
    if not seen[jti] then
      seen[jti] = true
      visit(jti, prefix .. 'tok:' .. jti)
      for _, child in ipairs(redis.call('SMEMBERS', prefix .. 'children:' .. jti)) do
        queue[#queue + 1] = child
      end
    end
  end
end
"""

REVOKE = APPEND + WALK + """
-- KEYS: changes stream, feed counter, the root record.
-- ARGV: prefix, root jti, at, feed maxlen, has reason, reason
-- Revokes the root and its live descendants: one already revoked, or a descendant already
-- expired, needs no write (nothing accepts it); the root is always marked.
local prefix, at, maxlen = ARGV[1], ARGV[3], ARGV[4]
local revoked = {}
walk(prefix, ARGV[2], function(jti, key)
  local state = redis.call('HMGET', key, 'revoked_at', 'exp')
  if redis.call('EXISTS', key) == 1 and not state[1] and (jti == ARGV[2] or tonumber(state[2]) > tonumber(at)) then
    redis.call('HSET', key, 'revoked_at', at)
    if ARGV[5] == '1' then
      redis.call('HSET', key, 'revoked_reason', ARGV[6])
    else
      redis.call('HDEL', key, 'revoked_reason')
    end
    append(KEYS[1], KEYS[2], maxlen, jti)
    revoked[#revoked + 1] = jti
  end
end)
return revoked
"""

SHORTEN = APPEND + WALK + """
-- KEYS: changes stream, feed counter.  ARGV: exp, root jti, feed maxlen, prefix
-- The token and everything attenuated from it end no later than exp: a child never outlives its
-- parent, rotated away or not.
local exp, maxlen = tonumber(ARGV[1]), ARGV[3]
walk(ARGV[4], ARGV[2], function(jti, key)
  local current = redis.call('HGET', key, 'exp')
  if current and exp < tonumber(current) then
    redis.call('HSET', key, 'exp', exp)
    append(KEYS[1], KEYS[2], maxlen, jti)
  end
end)
return 1
"""

TOUCH = """
-- KEYS: records.  ARGV: last use per record, same order
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local used = redis.call('HGET', key, 'last_used_at')
    if not used or tonumber(used) < tonumber(ARGV[i]) then
      redis.call('HSET', key, 'last_used_at', ARGV[i])
    end
  end
end
return 1
"""

FEED = """
-- KEYS: epoch, changes stream, feed counter.
-- ARGV: mode (since|current), cursor epoch, cursor id, cursor n, count, fresh epoch
-- Returns {epoch, id, n, 'ok'|'reset', jti...}; 'reset': the feed cannot say what changed since
-- the cursor (new epoch, entries trimmed away, stream rewound or gone), forget every cached record.
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[1], epoch)
end
local function field(fields, name)
  for j = 1, #fields, 2 do
    if fields[j] == name then
      return fields[j + 1]
    end
  end
  return nil
end
local function current(status)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if top[1] then
      return {epoch, top[1][1], tonumber(field(top[1][2], 'n')) or 0, status}
    end
  end
  return {epoch, '0-0', tonumber(redis.call('GET', KEYS[3])) or 0, status}
end
if ARGV[1] == 'current' then
  return current('ok')
end
if ARGV[2] ~= epoch then
  return current('reset')
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms then
    return nil
  end
  return tonumber(ms), tonumber(seq)
end
local cursor, expect = ARGV[3], tonumber(ARGV[4])
if not parse(cursor) or not expect then
  return current('reset')
end
local last = '0-0'
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  last = field(info, 'last-generated-id')
end
local lm, ls = parse(last)
local cm, cs = parse(cursor)
if lm < cm or (lm == cm and ls < cs) then
  return current('reset')
end
local out = {epoch, cursor, expect, 'ok'}
local entries = redis.call('XRANGE', KEYS[2], '(' .. cursor, '+', 'COUNT', ARGV[5])
for _, entry in ipairs(entries) do
  local n = tonumber(field(entry[2], 'n'))
  if n ~= expect + 1 then
    return current('reset')
  end
  expect = n
  out[2], out[3] = entry[1], n
  out[#out + 1] = field(entry[2], 'jti')
end
return out
"""
