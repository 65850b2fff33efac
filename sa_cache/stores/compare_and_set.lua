-- A conditional fill: replace the value only if it is still byte-for-byte what the miss observed.
-- KEYS[1]: the entry; ARGV[1]: the observed value; ARGV[2]: the new value; ARGV[3]: TTL in ms.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
