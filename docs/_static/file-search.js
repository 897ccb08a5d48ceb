// A page opened from file:// may not fetch other pages, which Sphinx's search does to show an excerpt
// under each result. There the results show titles only; served over http they show excerpts too.
if (window.location.protocol === 'file:') {
  DOCUMENTATION_OPTIONS.SHOW_SEARCH_SUMMARY = false;
}
