// The API page: Swagger UI on the dashboard's own spec (a file, not an inline script,
// so the page passes the dashboard's Content-Security-Policy).
"use strict";
const BASE = document.querySelector('meta[name="fleet-base"]').content;
window.ui = SwaggerUIBundle({url: BASE + "/openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, withCredentials: true});
